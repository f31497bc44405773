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

`minutes` runs the cells one at a time, in their order, within a time budget, and starts a cell
only when its estimated time fits in what is left (`run_within_budget`, `estimate_s`); a cell
that does not fit is passed over and the next one tried, so a cheaper one later may still run.
A cell's estimate is overhead + env steps / rate, from the most specific measurement made on
this backend and device: a cell of the same env and variant, else the slowest cell of the same
variant, among the cells finished in this invocation and the summary.json files in their results
directories; measured estimates get a 10% margin. With no measurement, `DEFAULT_RATES` for the
backend: below the slowest measured cell there, so that the first cell's guess errs long.
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


def run_grid(
    cells: list[Cell], jobs: int = 1, log=print, minutes: float | None = None
) -> list[str]:
    """Run the unfinished cells (`jobs` at a time, in processes when jobs > 1; with `minutes`,
    one at a time within that budget: `run_within_budget`); returns the names of the cells
    that failed."""
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
    if minutes is not None:
        return run_within_budget(cells, minutes, log=log).failed
    if jobs > 1:
        return _run_processes(pending, jobs, log)
    failed = []
    for i, cell in enumerate(pending, 1):
        log(f"[{i}/{len(pending)}] {cell.name} -> {cell.results_dir}")
        if run_one(cell, f"[{i}/{len(pending)}]", log) is None:
            failed.append(cell.name)
    return failed


def run_one(cell: Cell, tag: str, log, run=None) -> dict | None:
    """Run one cell in this process (`run`, default `run_cell`) and log the outcome; its
    summary, or None if it failed."""
    try:
        summary = (run or run_cell)(cell)
    except ValueError as err:  # the user's config: one line, as train.py's CLI
        log(f"{tag} {cell.name} failed: {err}")
        return None
    except Exception:
        log(f"{tag} {cell.name} failed:\n{traceback.format_exc()}")
        return None
    log(f"{tag} {cell.name} done: {describe(summary)}")
    return summary


# ---------------------------------------------------------------------------------------------
# Cells within a time budget (--minutes)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rate:
    """How fast cells run: env steps (all seeds) per second of training, plus a fixed overhead
    per cell (compile, the random-policy evaluation, writing), and where that was measured."""

    steps_per_s: float
    overhead_s: float
    source: str


# With nothing measured: below the slowest cells measured per backend, with overheads above
# their compile times (docs/performance.md, "POPGym cells within a time budget").
DEFAULT_RATES = {
    "gpu": Rate(30_000.0, 120.0, "the default for a GPU, nothing measured here"),
    "cpu": Rate(1_000.0, 60.0, "the default for a CPU, nothing measured here"),
}
MARGIN = 1.1  # on estimates from measurements


def cell_steps(cell: Cell) -> int:
    """Env steps a cell runs, all seeds together."""
    cfg = cell.config
    return cfg.num_updates * cfg.steps_per_update * cfg.num_seeds


def rate_of(summary: dict, source: str) -> Rate | None:
    """A finished cell's Rate from its summary (None if it lacks the times): training at its
    steps_per_s, and the rest of its wall time as overhead."""
    wall, sps = summary.get("wall_s"), summary.get("steps_per_s")
    steps = (summary.get("seeds") or 0) * (summary.get("env_steps_per_seed") or 0)
    if not wall or not steps:
        return None
    if sps:
        return Rate(float(sps), max(0.0, wall - steps / sps), source)
    return Rate(steps / wall, 0.0, source)


def slower(a: Rate | None, b: Rate) -> Rate:
    """The Rate that takes longer per env step (a None a counts as unmeasured)."""
    return b if a is None or 1 / b.steps_per_s > 1 / a.steps_per_s else a


class Rates:
    """The measurements the budget uses: per (env, variant) and, the slowest, per variant."""

    def __init__(self, backend: str, device: str | None = None):
        self.backend, self.device = backend, device
        self.by_cell: dict[tuple[str, str], Rate] = {}
        self.by_variant: dict[str, Rate] = {}

    def add(self, env: str, variant: str, summary: dict, source: str) -> None:
        """Record a finished cell, if it ran on this backend and device."""
        if summary.get("backend", self.backend) != self.backend:
            return
        if self.device and summary.get("device", self.device) != self.device:
            return
        rate = rate_of(summary, source)
        if rate is not None:
            self.by_cell[(env, variant)] = rate
            self.by_variant[variant] = slower(self.by_variant.get(variant), rate)

    def estimate_s(self, cell: Cell) -> tuple[float, str]:
        """(seconds the cell is estimated to take, the measurement it comes from)."""
        rate = self.by_cell.get((cell.env, cell.variant)) or self.by_variant.get(cell.variant)
        margin = MARGIN
        if rate is None:
            rate, margin = DEFAULT_RATES.get(self.backend, DEFAULT_RATES["gpu"]), 1.0
        return margin * (rate.overhead_s + cell_steps(cell) / rate.steps_per_s), rate.source


def recorded_rates(cells: list[Cell], backend: str, device: str | None) -> Rates:
    """The Rates of the cells already finished (their summary.json) on this backend/device."""
    rates = Rates(backend, device)
    for cell in cells:
        if is_finished(cell):
            summary = report.read_json(summary_path(cell))
            rates.add(cell.env, cell.variant, summary, f"measured: {cell.name}")
    return rates


@dataclasses.dataclass
class BudgetResult:
    ran: list[str]
    failed: list[str]
    not_started: list[str]
    used_s: float


def run_within_budget(
    cells: list[Cell],
    minutes: float,
    log=print,
    run=None,
    clock=time.monotonic,
    backend: str | None = None,
    device: str | None = None,
) -> BudgetResult:
    """Run the unfinished cells one at a time in their order, starting each only when its
    estimate (`Rates.estimate_s`) fits in the budget left; a cell that does not fit is passed
    over for the next. Every finished cell, recorded or run now, refines the estimates. `run`
    (default `run_cell`), `clock`, `backend` and `device` (default: jax's) are for tests."""
    if backend is None:
        import jax

        backend, device = jax.default_backend(), jax.devices()[0].device_kind
    start, budget = clock(), 60.0 * minutes
    rates = recorded_rates(cells, backend, device)
    result = BudgetResult([], [], [], 0.0)
    pending = [cell for cell in cells if not is_finished(cell)]
    log(f"budget {minutes:g} min for {len(pending)} unfinished cell(s), one at a time, in order")
    for i, cell in enumerate(pending, 1):
        tag = f"[{i}/{len(pending)}]"
        left = budget - (clock() - start)
        estimate, source = rates.estimate_s(cell)
        if estimate > left:
            log(f"{tag} {cell.name} not started: estimated {estimate / 60:.1f} min ({source}), "
                f"{left / 60:.1f} min left")  # fmt: skip
            result.not_started.append(cell.name)
            continue
        log(f"{tag} {cell.name} -> {cell.results_dir}: estimated {estimate / 60:.1f} min "
            f"({source}), {left / 60:.1f} min left")  # fmt: skip
        summary = run_one(cell, tag, log, run)
        if summary is None:
            result.failed.append(cell.name)
            continue
        result.ran.append(cell.name)
        rates.add(cell.env, cell.variant, summary, f"measured: {cell.name}")
    result.used_s = clock() - start
    if result.not_started:
        log(f"{len(result.not_started)} cell(s) not started within {minutes:g} min: "
            f"{', '.join(result.not_started)}; rerun with a larger --minutes to continue")  # fmt: skip
    return result


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
