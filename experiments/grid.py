"""Run a grid of cells resumably. A cell is one training run (`run.run`, with all its seeds in
one compiled program); it writes its scratch outputs (checkpoints, params, png) to `cfg.out`
under `runs/` (gitignored) and, when it completes, copies `config.json` and `metrics.csv` to its
results directory `<results>/<env>/<variant>/` and writes `summary.json` there last. A cell is
finished iff its summary.json exists. Rerunning an interrupted grid skips the finished cells,
continues an interrupted cell from its last checkpoint (when its scratch run has the same
config) and starts the others afresh. Every file is written atomically (temp file + rename).

`jobs > 1` runs that many cells at once, each in its own process (`python -m experiments.grid
CELL_JSON`), so that runs too small to fill an accelerator share it; each process then gets an
equal share of GPU memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless already set).
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

import numpy as np

from experiments import report

POLL_S = 2.0  # how often the parent looks at its worker processes
# Config fields that say where and how a run is written, not what it computes.
NOT_THE_RUN = {"out", "progress", "overwrite"}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (env, variant) of a grid: the full train.Config to run (config.out is its scratch
    run dir under runs/) and the results directory its small files go to."""

    env: str
    variant: str
    config: Any  # train.Config
    results_dir: str

    @property
    def name(self) -> str:
        return f"{self.env}/{self.variant}"


def summary_path(cell: Cell) -> str:
    return os.path.join(cell.results_dir, "summary.json")


def is_finished(cell: Cell) -> bool:
    """A cell is finished iff its summary.json exists (written last, atomically)."""
    return os.path.exists(summary_path(cell))


def config_changes(cell: Cell) -> list[str]:
    """For a finished cell: 'field: stored -> wanted' for each config field the grid would now
    run differently (NOT_THE_RUN aside)."""
    stored = report.read_json(os.path.join(cell.results_dir, "config.json"))
    wanted = dataclasses.asdict(cell.config)
    return [
        f"{k}: {stored[k]!r} -> {wanted[k]!r}"
        for k in sorted(set(stored) & set(wanted) - NOT_THE_RUN)
        if stored[k] != wanted[k]
    ]


def _clean(x):
    """JSON-safe copy: numpy scalars and arrays to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [_clean(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x if isinstance(x, str | int | float | bool | type(None)) else str(x)


def finish_cell(cell: Cell, wall_s: float, train_summary: dict, runtime: dict) -> dict:
    """Copy the run's config.json and metrics.csv from its scratch dir to the results dir and
    write summary.json (last). Returns the summary."""
    cfg = cell.config
    with open(os.path.join(cfg.out, "metrics.csv"), "rb") as f:
        metrics = f.read()
    config_path = os.path.join(cfg.out, "config.json")
    if os.path.exists(config_path):
        with open(config_path, "rb") as f:
            config = f.read()
    else:
        config = json.dumps(dataclasses.asdict(cfg), indent=2).encode()
    report.write_atomic(os.path.join(cell.results_dir, "config.json"), config)
    report.write_atomic(os.path.join(cell.results_dir, "metrics.csv"), metrics)

    curves = report.load_curves(os.path.join(cell.results_dir, "metrics.csv"))
    final, mmer = report.final_per_seed(curves), report.mmer_per_seed(curves)
    summary = dict(
        env=cell.env,
        variant=cell.variant,
        memory=cfg.memory,
        preset=cfg.preset,
        seeds=curves.num_seeds,
        env_steps_per_seed=int(curves.env_steps[-1]),
        updates=len(curves.env_steps),
        final_per_seed=final,
        final_mean=report.mean_std(final)[0],
        final_std=report.mean_std(final)[1],
        mmer_per_seed=mmer,
        mmer_mean=report.mean_std(mmer)[0],
        mmer_std=report.mean_std(mmer)[1],
        wall_s=wall_s,
        compile_s=train_summary.get("compile_s"),
        run_s=train_summary.get("run_s"),
        steps_per_s=train_summary.get("steps_per_s"),  # all seeds, compile excluded
        **runtime,
        finished_at=datetime.datetime.now().isoformat(timespec="seconds"),
        scratch_dir=cfg.out,
        train_summary=train_summary,
    )
    summary = _clean(summary)
    report.write_atomic(summary_path(cell), json.dumps(summary, indent=2) + "\n")
    return summary


def lifecycle():
    """The module that runs one training run (`run(cfg, resume)`, `parse_config(argv)`):
    run.py, or train.py from before the run's lifecycle moved out of it."""
    try:
        import run

        return run
    except ModuleNotFoundError as err:
        if err.name != "run":  # run.py exists but one of its imports is missing: say so
            raise
        import train

        return train


def same_run(cfg) -> bool:
    """Whether cfg.out holds a run (complete or not) of this very config."""
    stored = report.read_json(os.path.join(cfg.out, "config.json"))
    wanted = dataclasses.asdict(cfg)
    keys = set(wanted) - NOT_THE_RUN
    return set(stored) - NOT_THE_RUN == keys and all(stored[k] == wanted[k] for k in keys)


def run_cell(cell: Cell) -> dict:
    """Train the cell in this process (continuing its scratch run if that is the same config
    and unfinished; reusing it if complete) and record it; returns its summary."""
    import jax

    lc = lifecycle()
    cfg = cell.config
    can_resume = "resume" in inspect.signature(lc.run).parameters
    t0 = time.perf_counter()
    if can_resume and same_run(cfg) and os.path.exists(os.path.join(cfg.out, "params.msgpack")):
        train_summary = dict(reused_complete_run=True)  # trained, not yet recorded: record it
    elif can_resume and same_run(cfg):
        print(f"{cell.name}: continuing the run in {cfg.out} from its last checkpoint")
        train_summary = lc.run(cfg, resume=True)
    else:
        if hasattr(cfg, "overwrite"):  # a stale or half-started scratch run: replace it
            cfg = dataclasses.replace(cfg, overwrite=True)
        train_summary = lc.run(cfg)
    wall_s = time.perf_counter() - t0
    runtime = dict(
        jax=jax.__version__,
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        devices=len(jax.devices()),
    )
    return finish_cell(cell, wall_s, dict(train_summary or {}), runtime)


def describe(summary: dict) -> str:
    """One line: final and MMER ×100 and the wall time."""
    f, m = summary["final_per_seed"], summary["mmer_per_seed"]
    f = [np.nan if v is None else v for v in f]
    m = [np.nan if v is None else v for v in m]
    return (
        f"final {report.fmt_x100(f)}, MMER {report.fmt_x100(m)} (×100, "
        f"{summary['seeds']} seeds x {summary['env_steps_per_seed']:,} steps), "
        f"{summary['wall_s']:.0f} s"
    )


def run_grid(cells: list[Cell], jobs: int = 1, log=print) -> list[str]:
    """Run the unfinished cells (`jobs` at a time, in processes when jobs > 1); returns the
    names of the cells that failed."""
    pending = []
    for cell in cells:
        if not is_finished(cell):
            pending.append(cell)
            continue
        changes = config_changes(cell)
        if changes:
            log(
                f"warning: {cell.name} finished with a different config ({'; '.join(changes)}); "
                f"kept: delete {cell.results_dir} to rerun it"
            )
    log(
        f"{len(cells)} cells: {len(cells) - len(pending)} finished, {len(pending)} to run"
        + (f", {jobs} at a time" if jobs > 1 and pending else "")
    )
    if jobs > 1:
        return _run_processes(pending, jobs, log)
    failed = []
    for i, cell in enumerate(pending, 1):
        log(f"[{i}/{len(pending)}] {cell.name} -> {cell.results_dir}")
        try:
            log(f"[{i}/{len(pending)}] {cell.name} done: {describe(run_cell(cell))}")
        except ValueError as err:  # the user's config: one line, as train.py's CLI
            log(f"[{i}/{len(pending)}] {cell.name} failed: {err}")
            failed.append(cell.name)
        except Exception:
            log(f"[{i}/{len(pending)}] {cell.name} failed:\n{traceback.format_exc()}")
            failed.append(cell.name)
    return failed


# ---------------------------------------------------------------------------------------------
# Cells as processes (--jobs N)
# ---------------------------------------------------------------------------------------------


def write_spec(cell: Cell) -> str:
    """The cell as JSON in its scratch dir, for a worker process; returns the path."""
    spec = dict(
        env=cell.env,
        variant=cell.variant,
        results_dir=cell.results_dir,
        config=dataclasses.asdict(cell.config),
    )
    path = os.path.join(cell.config.out, "cell.json")
    report.write_atomic(path, json.dumps(spec, indent=2))
    return path


def worker_command(spec_path: str) -> list[str]:
    """The command that runs one cell in its own process."""
    return [sys.executable, "-m", "experiments.grid", spec_path]


def worker_env(jobs: int) -> dict:
    """The workers' environment: unbuffered output and 1/jobs of the GPU memory each (JAX
    would otherwise preallocate 75% in every process and the second would run out)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"} & set(env):
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / jobs:.2f}"
    return env


def _run_processes(pending: list[Cell], jobs: int, log) -> list[str]:
    queue, running, failed = list(pending), {}, []
    env, n = worker_env(jobs), len(pending)
    started = 0
    try:
        while queue or running:
            while queue and len(running) < jobs:
                cell = queue.pop(0)
                started += 1
                os.makedirs(cell.config.out, exist_ok=True)
                log_path = os.path.join(cell.config.out, "log.txt")
                with open(log_path, "w") as log_file:  # the child keeps its own descriptor
                    proc = subprocess.Popen(
                        worker_command(write_spec(cell)),
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,  # Ctrl-C reaches the parent only, which forwards it
                    )
                running[proc] = (cell, log_path, f"[{started}/{n}]")
                log(f"[{started}/{n}] {cell.name} started (pid {proc.pid}, log {log_path})")
            time.sleep(POLL_S)
            for proc in [p for p in running if p.poll() is not None]:
                cell, log_path, tag = running.pop(proc)
                if proc.returncode == 0 and is_finished(cell):
                    log(f"{tag} {cell.name} done: {describe(report.read_json(summary_path(cell)))}")
                else:
                    log(f"{tag} {cell.name} failed (exit {proc.returncode}); see {log_path}")
                    failed.append(cell.name)
    except KeyboardInterrupt:
        # Each running cell stops after its current segment and saves a checkpoint; a second
        # Ctrl-C stops them at once (their last complete checkpoint stays).
        log(f"Ctrl-C: stopping {len(running)} running cell(s) at their next checkpoint ...")
        for proc in running:
            proc.send_signal(signal.SIGINT)
        try:
            for proc in running:
                proc.wait()
        except KeyboardInterrupt:
            for proc in running:
                proc.send_signal(signal.SIGINT)
            for proc in running:
                proc.wait()
        raise
    return failed


def main(argv: list[str] | None = None) -> None:
    """Worker: `python -m experiments.grid CELL_JSON` runs one cell written by write_spec.
    Exit 2 on bad input, 130 when interrupted (rerun the grid to continue)."""
    import train

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m experiments.grid CELL_JSON", file=sys.stderr)
        sys.exit(2)
    spec = report.read_json(argv[0])
    cell = Cell(spec["env"], spec["variant"], train.Config(**spec["config"]), spec["results_dir"])
    try:
        print(describe(run_cell(cell)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        print(f"interrupted: {stop}", file=sys.stderr, flush=True)
        exit_interrupted(stop)


def exit_interrupted(stop: KeyboardInterrupt) -> None:
    """Exit 130; at once after a second Ctrl-C (run.py's `at_once`), as run.py's CLI does, so
    as not to wait for the program still running in XLA's threads."""
    if getattr(stop, "at_once", False):
        sys.stdout.flush()
        os._exit(130)
    sys.exit(130)


if __name__ == "__main__":
    main()
