"""One-off investigations of why SHM learns as it does; each is `python -m experiments.studies.NAME`
and its findings page is in docs/findings/."""
