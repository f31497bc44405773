"""What must happen before jax starts its backend: XLA's GPU determinism flag, and joining the
other processes of a run that spans several hosts (`jax.distributed`). `import gymnax` already
starts the backend (it builds a jnp array at import), so `python train.py` calls `start` before
its own imports, and `run.main` calls it again to strip the launch flags from the command line.

A run over several hosts (a multi-node GPU job, a TPU pod slice) is the same `train.py` command
on every host, plus either the three explicit flags or `--distributed` (jax's auto-detection
of Slurm, Open MPI, TPU pods, ...):

    python train.py --coordinator-address HOST0:1234 --num-processes 2 --process-id 0 [flags]
    python train.py --coordinator-address HOST0:1234 --num-processes 2 --process-id 1 [flags]

The flags are not part of the Config (they differ per host and are not saved with the run);
`--resume DIR` takes them too. The seeds are then sharded over every host's devices, and only
process 0 writes the run's files (run.py).
"""

from __future__ import annotations

import os
import sys

DETERMINISTIC_GPU_OPS = "--xla_gpu_deterministic_ops=true"
LAUNCH_FLAGS = {"--coordinator-address": str, "--num-processes": int, "--process-id": int}
AUTO_FLAG = "--distributed"

_joined = False  # whether this process has joined its cluster


def deterministic_gpu_ops() -> None:
    """Ask XLA for deterministic GPU scatters and reductions (and no autotuning, whose kernel
    choice can vary between runs), so that on a GPU the same seed gives the same numbers; a
    no-op on a CPU. Kept when XLA_FLAGS already sets it either way (=false to trade exact
    repeats for speed). It only acts if jax's backend has not started yet."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_GPU_OPS}".strip()


def split_launch_flags(argv: list[str]) -> tuple[list[str], dict]:
    """(argv without the launch flags, the `jax.distributed.initialize` keyword arguments they
    give: {} for a single-process run). ValueError, one line, on an incomplete set."""
    rest, given, auto = [], {}, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        if arg == AUTO_FLAG:
            auto = True
        elif name in LAUNCH_FLAGS:
            if not value:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value")
                i, value = i + 1, argv[i + 1]
            try:
                given[name] = LAUNCH_FLAGS[name](value)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
        else:
            rest.append(arg)
        i += 1
    if given and not auto and len(given) < len(LAUNCH_FLAGS):
        missing = ", ".join(sorted(set(LAUNCH_FLAGS) - set(given)))
        raise ValueError(f"a multi-host run needs {missing} too (or {AUTO_FLAG} to auto-detect)")
    n, pid = given.get("--num-processes"), given.get("--process-id")
    if n is not None and n < 1:
        raise ValueError(f"--num-processes must be >= 1, got {n}")
    if n is not None and pid is not None and not 0 <= pid < n:
        raise ValueError(f"--process-id must be in 0..{n - 1}, got {pid}")
    kwargs = {name[2:].replace("-", "_"): value for name, value in given.items()}
    if auto:
        kwargs["auto"] = True
    return rest, kwargs


def start(argv: list[str]) -> list[str]:
    """Set the GPU determinism flag and, if the launch flags ask for it, join the cluster with
    `jax.distributed.initialize` (once per process; it must precede jax's backend, which
    `import gymnax` starts). Returns argv without the launch flags. ValueError, one line, if the
    flags are incomplete or joining fails."""
    global _joined
    deterministic_gpu_ops()
    argv, kwargs = split_launch_flags(argv)
    if not kwargs or _joined:
        return argv
    import jax

    auto = kwargs.pop("auto", False)  # jax.distributed.initialize auto-detects what is missing
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as err:  # backend already started, no cluster found, ...
        first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
        hint = f" ({AUTO_FLAG} found no cluster: pass the three flags)" if auto else ""
        raise ValueError(f"jax.distributed.initialize failed: {first_line}{hint}") from None
    _joined = True
    return argv


def start_from_command_line() -> None:
    """`start(sys.argv[1:])` for `python train.py`: bad launch flags print one line, exit 2."""
    try:
        start(sys.argv[1:])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
