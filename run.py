"""A training run's lifecycle around an algorithm (train.py's PPO, sac.py's SAC): segments,
checkpoints, exact resume, Ctrl-C, live logs, outputs, evaluation and the command line.
`python train.py [flags]` and `python sac.py [flags]` land in `main` here; the algorithm files
stay the algorithm (config -> networks -> `make_train`).

    python train.py --env RepeatFirstEasy --out runs/rf       # train (Ctrl-C: stop and save)
    python train.py --resume runs/rf                          # continue from the last checkpoint
    python train.py --eval runs/rf --episodes 256 --greedy    # evaluate the trained policy
    python train.py --list                                    # env ids and memory names

How a run goes (`run`): `make_train(cfg)` gives the run as pure functions; one program, a
segment of K updates (a `lax.scan` over updates, ~5 s of work: `segment_length`), is compiled
once and called until the run is done. After each segment its rows are appended to metrics.csv
and logged to TensorBoard (and W&B with --wandb), while the next segment already runs. Every
--checkpoint-every updates (auto: a few minutes' work), at the end, and on Ctrl-C, the whole
RunnerState (params, optimiser state, env states, memory carries, PRNG keys, update counter,
...) is saved with orbax, asynchronously. orbax writes a checkpoint into a temporary directory
and renames it when complete, so a crash or a second Ctrl-C never leaves a half-written one.
A resumed run restores that state and calls the same program, so it ends bit-identical to the
run left alone (tests/test_run.py).

A run directory (--out):
    config.json       the Config; --resume and --eval read it
    metrics.csv       one row per update per seed, appended after every segment
    checkpoints/<u>/  orbax checkpoints of the RunnerState after u updates (the last two kept)
    tensorboard/      TensorBoard event files (tensorboardX), written live
    returns.png       mean ± std over seeds of the headline metric, with the random policy
    params.msgpack    the final params (leaves [num_seeds, ...]), written at the end

The algorithm is a module (`ALGORITHMS`: "ppo" -> train, "sac" -> sac) that provides:
    Config            a frozen dataclass with the fields env, memory, num_seeds, seed, out,
                      progress, checkpoint_every, overwrite, wandb, wandb_project, wandb_name,
                      preset, theta_init, calib_init, and the properties mem_size,
                      num_updates (the rows of metrics.csv) and steps_per_update (env steps per
                      update per seed); a field `algorithm` names the module in config.json
                      (a config.json without it is PPO's)
    PRESETS           {name: Config}, "none" the default
    make_env_and_network(cfg) -> Setup with `eval_params` (None unless meta-RL) and `memory`
                      (its `initialize_carry` gives the reported state size); ValueError, one
                      line, on any bad input
    make_train(cfg, progress) -> Train(init, updates, num_updates) as train.Train: the
                      RunnerState has `params` and `update` [S]; metrics include
                      episode_return (and eval_return for meta-RL envs)
    make_keys(cfg), seed_map(num_seeds), make_evaluate(cfg, setup, num_episodes,
                      random_policy=False, greedy=False) -> evaluate(params, key) -> {metric}
    optional: work_per_update(cfg) (run.py's work units; default PPO's env steps x (1 +
                      num_epochs)), USAGE (the --help text), FORMER_DEFAULTS.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import serialization
from jax.experimental import multihost_utils

import envs
import launch
import shm_jax

# run.py is generic over the algorithm module (see above) and imports none: these name the
# algorithm's types in signatures (train.Config or sac.Config, and so on).
Config = RunnerState = Setup = Any

EVAL_EPISODES = 100  # episodes per seed for --eval's default and the random-policy baseline
# Work of one update: env steps x (1 + epochs) x seeds (the default config: 20,480, ~0.2 s on a
# quiet 2-core CPU). A segment is ~2^19 of it (~5 s), the auto checkpoint interval ~2^24 (~3 min).
SEGMENT_WORK, CHECKPOINT_WORK = 2**19, 2**24
RUN_FILES = ("config.json", "metrics.csv", "checkpoints", "tensorboard", "returns.png")
RUN_FILES += ("params.msgpack", "wandb_id.txt")
ALGORITHMS = {"ppo": "train", "sac": "sac"}  # config.json's `algorithm` -> its module


def algorithm_module(which=None):
    """The algorithm module of a Config (by its `algorithm` field; none: PPO), of a name in
    ALGORITHMS or a module name ("train", "sac"); a module is returned as is."""
    if which is None:
        which = "ppo"
    if hasattr(which, "make_train"):
        return which
    if not isinstance(which, str):
        which = getattr(which, "algorithm", "ppo")
    if which not in ALGORITHMS and which not in ALGORITHMS.values():
        raise ValueError(f"unknown algorithm {which!r}; choose one of {', '.join(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS.get(which, which))


def script_name(cfg) -> str:
    """The command that trains cfg's algorithm: train.py or sac.py."""
    return f"{algorithm_module(cfg).__name__}.py"


class RunInterrupted(KeyboardInterrupt):
    """Raised by `run` after Ctrl-C; `str()` is the one line to print (where the run stopped
    and how to resume it). `at_once`: the second Ctrl-C, nothing was waited for."""

    def __init__(self, message: str, at_once: bool = False):
        super().__init__(message)
        self.at_once = at_once


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------


def resume_command(out: str, script: str = "train.py") -> str:
    return f"python {script} --resume {shlex.quote(out)}"


def holds_run(directory: str) -> bool:
    """Whether `directory` holds (the start of) a training run."""
    return any(os.path.exists(os.path.join(directory, name)) for name in RUN_FILES[:3])


def work_per_update(cfg: Config) -> float:
    """One update's work per seed: the algorithm's `work_per_update`, else PPO's env steps x
    (1 + epochs)."""
    algo = algorithm_module(cfg)
    if hasattr(algo, "work_per_update"):
        return algo.work_per_update(cfg)
    return cfg.steps_per_update * (1 + cfg.num_epochs)


def _updates_for(cfg: Config, work: int) -> int:
    return max(1, round(work / (work_per_update(cfg) * cfg.num_seeds)))


def checkpoint_interval(cfg: Config) -> int:
    """Updates between checkpoints: --checkpoint-every, or (0, auto) CHECKPOINT_WORK's worth:
    819 updates (~3 min on a quiet 2-core CPU) for the default config, 8 for the popgym presets.
    A checkpoint costs ~0.2 s of wall time; a run also saves at its end and on Ctrl-C."""
    return cfg.checkpoint_every if cfg.checkpoint_every > 0 else _updates_for(cfg, CHECKPOINT_WORK)


def segment_length(cfg: Config) -> int:
    """K, the updates of the one compiled program, called until the run is done: SEGMENT_WORK's
    worth (26 updates, ~5 s, for the default config; 1 for the popgym presets), at most the
    checkpoint interval (a checkpoint is due at the end of a segment) and the run. Ctrl-C
    stops at the end of a segment; metrics.csv and the logs are written after each."""
    return min(_updates_for(cfg, SEGMENT_WORK), checkpoint_interval(cfg), cfg.num_updates)


def check_run(cfg: Config, resume: bool = False, algo=None) -> Setup:
    """Every check that can fail on user input, before anything is compiled: the config, the
    seeds against the devices of a run over several hosts, the output directory (an existing run
    is refused unless --overwrite; a file or an unwritable path is reported), --wandb's package.
    ValueError with a one-line message. With several processes, process 0 checks the directory
    and the others fail with it. `algo`: the algorithm module (default: cfg's)."""
    setup = (algo or algorithm_module(cfg)).make_env_and_network(cfg)
    if cfg.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0 = auto), got {cfg.checkpoint_every}")
    processes, devices = jax.process_count(), jax.device_count()
    if processes > 1 and cfg.num_seeds % devices:
        raise ValueError(
            f"--num-seeds {cfg.num_seeds} must be a multiple of the {devices} devices of this "
            f"{processes}-process run (the seeds are sharded over every host's devices)"
        )
    error = None
    if is_main_process():
        try:
            _check_out(cfg, resume)
        except ValueError as err:
            error = err
    if any_process(error is not None):
        raise error or ValueError("process 0 refused the run (its error says why)")
    return setup


def _check_out(cfg: Config, resume: bool) -> None:
    """check_run's part for the files process 0 writes: --out and --wandb."""
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a directory")
    if resume and os.path.exists(os.path.join(out, "params.msgpack")):
        raise ValueError(f"the run in {out!r} is complete; evaluate it with --eval {out}")
    if not resume and os.path.isdir(out) and holds_run(out) and not cfg.overwrite:
        raise ValueError(
            f"--out {out!r} already holds a run: continue it with "
            f"`{resume_command(out, script_name(cfg))}`, "
            "or pass --overwrite to replace it"
        )
    parent = out
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    parent = parent or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out!r} is not writable ({parent!r} is not a writable directory)")
    if cfg.wandb:
        _import_wandb()


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install wandb") from None
    return wandb


def start_run_dir(cfg: Config) -> None:
    """Create --out (replacing the run there with --overwrite) and write config.json."""
    if cfg.overwrite:
        for name in RUN_FILES:
            path = os.path.join(cfg.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


def load_config(directory: str, flag: str = "--resume") -> Config:
    """The Config of the run in `directory` (ValueError if there is none), of the algorithm its
    `algorithm` key names (PPO's without one)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {directory!r}: no run there (no config.json)")
    with open(path) as f:
        fields = json.load(f)
    algo = algorithm_module(fields.get("algorithm", "ppo"))
    known = {f.name for f in dataclasses.fields(algo.Config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: fields {unknown} are not in this {algo.__name__}.py's Config")
    former = getattr(algo, "FORMER_DEFAULTS", {})
    return algo.Config(**{**former, **fields})  # keys a config.json predates


# ---------------------------------------------------------------------------------------------
# Checkpoints (orbax)
# ---------------------------------------------------------------------------------------------


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class Checkpoints:
    """orbax checkpoints of the whole RunnerState (any fields: it is saved as a pytree) in
    DIR/checkpoints/<updates done>/. Typed PRNG keys are stored as their raw key data.

    Saves are asynchronous: `save` returns once the arrays are copied to the host and the write
    continues in a background thread (orbax waits for it before the next save; `wait` waits).
    In a run over several hosts every process saves its shards, synchronously: orbax's barriers
    are then collectives, which must not interleave with a running segment's."""

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        options = ocp.CheckpointManagerOptions(
            max_to_keep=2,
            enable_async_checkpointing=jax.process_count() == 1,
            cleanup_tmp_directories=True,
        )
        path = os.path.abspath(os.path.join(directory, "checkpoints"))
        self.manager = ocp.CheckpointManager(path, options=options)
        self.saving_s = 0.0  # main-thread time spent in `save` (the run's overhead)

    def latest(self) -> int | None:
        """Updates done at the last complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, runner: RunnerState) -> None:
        t0 = time.perf_counter()
        raw = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, runner)
        step = int(np.asarray(runner.update.addressable_data(0)).reshape(-1)[0])
        self.manager.save(step, args=self.ocp.args.StandardSave(raw))
        self.saving_s += time.perf_counter() - t0

    def restore(self, step: int, like: RunnerState, key_impl, sharding=None) -> RunnerState:
        """The RunnerState saved at `step`; `like`: its shapes (jax.eval_shape of init);
        `sharding`: where its leaves go (default: this process's first device)."""
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def abstract(x):
            if _is_key(x):
                x = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        raw = self.manager.restore(
            step, args=self.ocp.args.StandardRestore(jax.tree.map(abstract, like))
        )
        return jax.tree.map(
            lambda x, r: jax.random.wrap_key_data(r, impl=key_impl) if _is_key(x) else r,
            like,
            raw,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def last_complete_checkpoint(directory: str) -> int:
    """Updates done at the last complete checkpoint in DIR/checkpoints (0 if none). orbax names
    a checkpoint's directory by its step only once the checkpoint is complete."""
    path = os.path.join(directory, "checkpoints")
    steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
    return max(steps, default=0)


def restore_params(cfg: Config):
    """The params of the last checkpoint of the run in cfg.out (for a run without params.msgpack,
    e.g. one stopped with Ctrl-C), or None."""
    if not os.path.isdir(os.path.join(cfg.out, "checkpoints")):
        return None
    checkpoints = Checkpoints(cfg.out)
    try:
        step = checkpoints.latest()
        if step is None:
            return None
        algo = algorithm_module(cfg)
        keys = algo.make_keys(cfg)
        like = jax.eval_shape(algo.make_train(cfg).init, keys)
        return checkpoints.restore(step, like, jax.random.key_impl(keys)).params
    finally:
        checkpoints.close()


# ---------------------------------------------------------------------------------------------
# metrics.csv and live logs
# ---------------------------------------------------------------------------------------------


def csv_columns(names) -> list[str]:
    """metrics.csv's header: update, seed, env_steps, steps_per_s, then the metrics (episode
    return, length and the eval return first)."""
    names = sorted(names)
    first = [n for n in ("episode_return", "episode_length", "eval_return") if n in names]
    rest = [n for n in names if n not in first]
    return ["update", "seed", "env_steps", "steps_per_s", *first, *rest]


def append_csv(cfg: Config, first_update: int, metrics: dict, steps_per_s: np.ndarray) -> None:
    """Append rows for updates first_update + 1 .. + n (metrics {name: [n, S]})."""
    path = os.path.join(cfg.out, "metrics.csv")
    columns = csv_columns(metrics)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(columns)
        for i in range(len(steps_per_s)):
            u = first_update + i + 1
            for s in range(cfg.num_seeds):
                row = [u, s, u * cfg.steps_per_update, f"{steps_per_s[i]:.1f}"]
                values = (metrics[n][i, s] for n in columns[4:])
                writer.writerow(row + ["" if np.isnan(v) else f"{v:.6g}" for v in values])


def truncate_csv(cfg: Config, updates: int) -> None:
    """Drop the rows of updates after `updates` (written after the last checkpoint)."""
    path = os.path.join(cfg.out, "metrics.csv")
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # A row cut short by a second Ctrl-C has fewer columns; it is past the checkpoint anyway.
    header = rows[:1]
    keep = header + [r for r in rows[1:] if len(r) == len(header[0]) and int(r[0]) <= updates]
    keep = keep if updates else []
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(path + ".tmp", path)


def read_csv(cfg: Config) -> dict[str, np.ndarray]:
    """metrics.csv as {column: [updates, seeds] float} (NaN where empty)."""
    with open(os.path.join(cfg.out, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    U = len(rows) // cfg.num_seeds
    return {
        name: np.array([float(r[name] or "nan") for r in rows]).reshape(U, cfg.num_seeds)
        for name in rows[0]
    }


class Loggers:
    """Live logs of the seed-mean of every metric per update, at env steps (per seed):
    TensorBoard event files in DIR/tensorboard (tensorboardX), and W&B with --wandb. A resumed
    run purges TensorBoard's events logged after its checkpoint."""

    def __init__(self, cfg: Config, done_updates: int):
        from tensorboardX import SummaryWriter

        self.cfg = cfg
        purge = done_updates * cfg.steps_per_update + 1 if done_updates else None
        self.tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"), purge_step=purge)
        self.wandb = None
        if cfg.wandb:
            wandb = _import_wandb()
            id_path = os.path.join(cfg.out, "wandb_id.txt")
            run_id = open(id_path).read().strip() if os.path.exists(id_path) else None
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                name=cfg.wandb_name or os.path.basename(os.path.abspath(cfg.out)),
                config=dataclasses.asdict(cfg),
                dir=cfg.out,
                id=run_id,
                resume="allow",
            )
            with open(id_path, "w") as f:
                f.write(self.wandb.id)

    def log(self, first_update: int, metrics: dict) -> None:
        n = len(next(iter(metrics.values())))
        with warnings.catch_warnings():  # all-NaN: no episode finished in that update
            warnings.simplefilter("ignore", RuntimeWarning)
            means = {k: np.nanmean(v, axis=1) for k, v in metrics.items()}
        for i in range(n):
            step = (first_update + i + 1) * self.cfg.steps_per_update
            row = {k: float(v[i]) for k, v in means.items() if np.isfinite(v[i])}
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)
            if self.wandb is not None:
                self.wandb.log(row, step=step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """Host side of the progress callback: a tqdm bar and the wall time of every update."""

    def __init__(self, cfg: Config, headline: str, show: bool):
        self.cfg, self.headline, self.show = cfg, headline, show
        self.times: dict[int, float] = {}
        self.bar = None
        self.start()

    def start(self, done_updates: int = 0) -> None:
        """(Re)start the clock and the bar: call it right before running the compiled program."""
        from tqdm import tqdm  # (tqdm.auto wants ipywidgets in a notebook)

        if self.bar is not None:
            self.bar.close()
        per_update = self.cfg.steps_per_update * self.cfg.num_seeds
        self.bar = tqdm(
            total=self.cfg.num_updates * per_update,
            initial=done_updates * per_update,
            unit="step",
            unit_scale=True,
            desc=f"{self.cfg.env} {self.cfg.memory}",
            disable=not self.show,
            dynamic_ncols=True,
        )
        self.times = {done_updates: time.perf_counter()}
        self.start_time = self.times[done_updates]

    def __call__(self, update, metrics) -> None:
        self.times[int(update)] = time.perf_counter()
        self.bar.update(self.cfg.steps_per_update * self.cfg.num_seeds)
        if np.isfinite(metrics[self.headline]).any():
            value = np.nanmean(metrics[self.headline])
            self.bar.set_postfix_str(f"{self.headline} {value:.3f}", refresh=False)

    def steps_per_second(self, first_update: int, n: int) -> np.ndarray:
        """[n] env steps per second (all seeds) of updates first_update + 1 .. + n."""
        done = [self.times.get(u, np.nan) for u in range(first_update, first_update + n + 1)]
        return self.cfg.steps_per_update * self.cfg.num_seeds / np.diff(np.asarray(done))


def headline_metric(setup: Setup) -> str:
    """The metric the bar, plot and summary report: eval-task return for meta-RL envs."""
    return "eval_return" if setup.eval_params is not None else "episode_return"


# ---------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------


class _Interrupt:
    """Within the block, the first Ctrl-C only sets `requested` (the run stops after the current
    segment); it then restores Python's handler, so a second one raises KeyboardInterrupt at
    once. Outside the main thread (where signals cannot be handled) it does nothing."""

    def __init__(self, message: Callable[[], str]):
        self.message, self.requested, self.previous = message, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{self.message()}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _in_background(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start fn() in a worker thread; returns `result()`, which waits for it in Python. A signal
    handler runs only in the main thread and only between Python bytecodes, so a main thread
    blocked inside XLA (compiling, running) would hold Ctrl-C until the whole run had finished.
    """
    box: dict[str, Any] = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as err:  # re-raised in the main thread
            box["err"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()

    def result():
        while worker.is_alive():
            worker.join(0.05)
        if "err" in box:
            raise box["err"]
        return box["out"]

    return result


def _wait(fn: Callable[[], Any]) -> Any:
    """fn() in a worker thread, waited for in Python (see `_in_background`)."""
    return _in_background(fn)()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    """Whether this process writes the run's files: process 0 of a run over several hosts."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (a collective: with several, all must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def to_host(tree):
    """numpy copies of a pytree of arrays whose shards may lie on several hosts (a collective:
    with several processes, all must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _sync(name: str) -> None:
    """Wait here for every process of a run over several hosts."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def seed_sharding(num_seeds: int):
    """A sharding that splits the seed axis over all devices (every host's, with several
    processes), or None with one device or, in one process, seeds that do not divide evenly."""
    devices = jax.devices()
    if len(devices) < 2 or num_seeds % len(devices):
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices), ("seed",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))


def model_size(setup: Setup, params) -> tuple[int, int]:
    """(parameters per seed, the memory's state size per env in floats: H² for SHM, h for
    the GRU; complex numbers count twice)."""
    leaves = jax.tree.leaves(params)
    n_params = sum(int(np.prod(x.shape[1:])) for x in leaves)  # leaves [S, ...]
    carry = jax.eval_shape(lambda: setup.memory.initialize_carry((1,)))
    floats = [
        x.size * (1 + np.issubdtype(x.dtype, np.complexfloating)) for x in jax.tree.leaves(carry)
    ]
    return n_params, int(sum(floats))


def run(cfg: Config, resume: bool = False, algo=None) -> dict:
    """Train per `cfg` in segments, write the outputs to cfg.out, print and return a summary.

    `resume`: continue the run in cfg.out from its last checkpoint (cfg is its config.json).
    Ctrl-C raises `RunInterrupted` once the current segment is saved (a second Ctrl-C: at once).
    The summary: final, final_std, final_per_seed (the headline metric over the last 10% of
    updates), final_metrics (every episode metric, seed mean), compile_s, run_s, steps_per_s,
    random_return, random_metrics, devices, params, state_size, checkpoint_s. In a run over
    several hosts (launch.py) process 0 prints and returns it; the others return compile_s,
    run_s and devices. `algo`: the algorithm module (default: cfg's, `algorithm_module`).
    """
    algo = algo or algorithm_module(cfg)
    setup = check_run(cfg, resume, algo)
    # A run over several hosts: every process runs the same program on its devices' seeds, and
    # process 0 alone writes the files (csv, logs, progress, params, plot; checkpoints: all).
    main = is_main_process()
    if main and not resume:
        start_run_dir(cfg)
    _sync("run directory ready")
    headline = headline_metric(setup)
    U, S, K = cfg.num_updates, cfg.num_seeds, segment_length(cfg)
    interval = checkpoint_interval(cfg)
    progress = Progress(cfg, headline, show=False)
    program = algo.make_train(cfg, progress)  # its progress callback runs on process 0
    keys = algo.make_keys(cfg)
    sharding = seed_sharding(S)
    shard_seeds = {} if sharding is None else dict(out_shardings=sharding)
    checkpoints = Checkpoints(cfg.out)
    done = (checkpoints.latest() or 0) if resume else 0
    if main:
        truncate_csv(cfg, done)
    loggers = Loggers(cfg, done) if main else None

    def stopped_line(at_once: bool) -> str:
        step = last_complete_checkpoint(cfg.out) if at_once else done
        where = f"update {step}/{U} ({step * cfg.steps_per_update:,} env steps per seed)"
        command = resume_command(cfg.out, script_name(algo))
        if not at_once:
            return f"stopped at {where}, saved in {cfg.out}; resume with: {command}"
        if not step:
            return f"stopped at once, before the first checkpoint; start again with: {command}"
        return f"stopped at once; the last checkpoint, {where}, is valid; resume with: {command}"

    try:
        if main:
            print(
                f"compiling {cfg.env} / {cfg.memory}: a segment of {K} update(s) x {S} seed(s), "
                "compiled once for the whole run (first run of this config; often 10-60 s on a "
                "CPU) ...",
                flush=True,
            )
        t0 = time.perf_counter()
        if done:
            like = jax.eval_shape(program.init, keys)
            runner = checkpoints.restore(done, like, jax.random.key_impl(keys), sharding)
        else:
            runner = _wait(lambda: jax.jit(program.init, **shard_seeds)(keys))
        segment = jax.jit(lambda r: program.updates(r, K, stop=U))
        compiled = _wait(lambda: segment.lower(runner).compile())
        compile_s = time.perf_counter() - t0

        running = None  # (first, last) update of the segment running now

        def pressed() -> str:
            now = f"finishing updates {running[0]}-{running[1]} of {U}" if running else "stopping"
            return f"Ctrl-C: {now}, then saving (press Ctrl-C again to stop at once)"

        saved = done
        warned = False

        def write(start: int, n: int, runner: RunnerState, metrics: dict, last=False) -> None:
            """A segment's outputs: rows in metrics.csv, live logs, then the checkpoint if one
            is due (or this is the last segment of the session)."""
            nonlocal saved, warned
            if main:
                warning = None if warned else nonfinite_warning(cfg, start, metrics)
                if warning:
                    progress.bar.write(warning, file=sys.stderr)
                    warned = True
                append_csv(cfg, start, metrics, progress.steps_per_second(start, n))
                loggers.log(start, metrics)
            if last or start + n - saved >= interval:
                checkpoints.save(runner)
                saved = start + n

        progress.show = cfg.progress and main
        progress.start(done)
        first, t0 = done, time.perf_counter()
        # One process writes while the next segment runs; several write in between segments,
        # so that every host issues its collectives (gathers, orbax's barriers) in one order.
        overlap = jax.process_count() == 1
        with _Interrupt(pressed) as interrupt:
            unwritten = None  # the last segment's (start, n, runner, metrics)
            while done < U and not any_process(interrupt.requested):
                if unwritten is not None and not overlap:
                    write(*unwritten)
                    unwritten = None
                n = min(K, U - done)
                running = (done + 1, done + n)
                result = _in_background(lambda r=runner: jax.block_until_ready(compiled(r)))
                if unwritten is not None:  # written while the next segment runs
                    write(*unwritten)
                runner, metrics = result()
                running = None
                metrics = {k: v[:n] for k, v in to_host(metrics).items()}
                unwritten = (done, n, runner, metrics)
                done += n
            if unwritten is not None:
                write(*unwritten, last=True)
            _wait(checkpoints.wait)
            run_s = time.perf_counter() - t0
            progress.bar.close()
            if done < U:
                raise RunInterrupted(stopped_line(at_once=False))
            params = _wait(lambda: to_host(runner.params))
            if not main:  # the summary below reads metrics.csv, which process 0 writes
                return dict(compile_s=compile_s, run_s=run_s, devices=jax.device_count())
            evaluate = jax.jit(algo.make_evaluate(cfg, setup, EVAL_EPISODES, random_policy=True))
            random = _wait(lambda: jax.device_get(evaluate(None, jax.random.key(cfg.seed + 1))))
            summary = write_outputs(cfg, params, headline, float(random["episode_return"]))
    except KeyboardInterrupt as err:
        progress.bar.close()
        if isinstance(err, RunInterrupted):
            raise
        raise RunInterrupted(stopped_line(at_once=True), at_once=True) from None
    finally:
        if loggers is not None:
            loggers.close()
        checkpoints.close()

    n_params, state_size = model_size(setup, runner.params)
    steps = (done - first) * cfg.steps_per_update * S
    summary.update(
        compile_s=compile_s,
        run_s=run_s,
        steps_per_s=steps / run_s if run_s > 0 else float("nan"),
        random_return=float(random["episode_return"]),
        random_metrics={k: float(v) for k, v in random.items() if k != "episodes"},
        devices=1 if sharding is None else len(jax.devices()),
        params=n_params,
        state_size=state_size,
        checkpoint_s=checkpoints.saving_s,
    )
    extras = _metric_text(summary["final_metrics"], skip=(headline,))
    random_extras = _metric_text(summary["random_metrics"], skip=("episode_return",))
    print(
        f"{cfg.env} | {cfg.memory} (size {cfg.mem_size}, state {state_size:,}, "
        f"{n_params:,} params) | {S} seed(s) x {U * cfg.steps_per_update:,} steps | final "
        f"{headline} {summary['final']:.3f} ± {summary['final_std']:.3f}{extras} (random "
        f"policy {summary['random_return']:.3f}{random_extras}) | compile {compile_s:.1f}s, "
        f"run {run_s:.1f}s, {summary['steps_per_s']:,.0f} steps/s | -> {cfg.out}"
    )
    return summary


def nonfinite_warning(cfg: Config, first_update: int, metrics: dict) -> str | None:
    """A one-line warning if a segment's gradient norm or value (critic) loss is inf/NaN in any
    seed (metrics: name -> [n, seeds]), naming the first such update and the usual fix; else
    None. Updates with a `grad_updates` metric of 0 (no gradient step) are not checked."""
    names = [n for n in ("grad_norm", "value_loss", "critic_loss") if n in metrics]
    bad = np.zeros_like(np.asarray(metrics[names[0]]), bool)
    for name in names:
        bad |= ~np.isfinite(np.asarray(metrics[name]))
    if "grad_updates" in metrics:  # an update without gradient steps (SAC's random start)
        bad &= np.asarray(metrics["grad_updates"]) > 0
    if not bad.any():
        return None
    update, seed = np.argwhere(bad)[0]
    fix = (
        " SHM's memory overflowed float32: on episodes longer than ~100 steps add "
        "--calib-init zeros, or use --theta-init xavier (docs/findings/bounded-start.md)."
        if cfg.memory.startswith("shm")
        and cfg.theta_init == "xavier_abs"
        and cfg.calib_init == "lecun"
        else " Lower --lr, or check the env's rewards."
    )
    return (
        f"warning: non-finite gradient norm or value loss at update {first_update + update + 1}, "
        f"seed {seed}: the run is diverging.{fix}"
    )


def _metric_text(metrics: dict, skip=()) -> str:
    """', episode_success 0.810, ...' for every episode metric but those in `skip`."""
    return "".join(
        f", {k} {v:.3f}"
        for k, v in metrics.items()
        if k.startswith("episode_") and k not in skip and k != "episode_length"
    )


def _ffill(x: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs along axis 0 of [U, S] (updates in which no episode finished)."""
    x = x.copy()
    for u in range(1, len(x)):
        x[u] = np.where(np.isnan(x[u]), x[u - 1], x[u])
    return x


def _final(curve: np.ndarray) -> np.ndarray:
    """[S] per-seed mean of the forward-filled curve [U, S] over its last 10% of updates."""
    tail = _ffill(curve)[-max(1, len(curve) // 10) :]
    if not np.isfinite(tail).any():
        return np.full(curve.shape[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(tail, axis=0)


def write_outputs(cfg: Config, params, headline: str, random_return: float) -> dict:
    """At the end of a run: params.msgpack and returns.png; the final metrics, read back from
    metrics.csv (the same numbers whether or not the run was resumed)."""
    with open(os.path.join(cfg.out, "params.msgpack"), "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(params)))
    metrics = read_csv(cfg)
    env_steps = metrics["env_steps"][:, 0]
    plot_returns(
        env_steps,
        _ffill(metrics[headline]),
        headline,
        f"{cfg.env}, {cfg.memory} (size {cfg.mem_size})",
        os.path.join(cfg.out, "returns.png"),
        random_return=random_return if headline == "episode_return" else None,
    )
    per_seed = _final(metrics[headline])
    final_metrics = {
        k: float(np.mean(_final(v)))
        for k, v in metrics.items()
        if k.startswith("episode_") and k != "episodes"
    }
    return dict(
        final=float(np.mean(per_seed)),
        final_std=float(np.std(per_seed)),
        final_per_seed=per_seed.tolist(),
        final_metrics=final_metrics,
    )


def plot_returns(env_steps, curve, ylabel: str, title: str, path: str, random_return=None):
    """Mean ± std over seeds of curve [U, S] against env steps, and the random policy's return
    as a dashed line, saved to path. Uses matplotlib's object API, not pyplot, so it never
    switches the backend of a notebook that imports it."""
    from matplotlib.figure import Figure

    with warnings.catch_warnings():  # all-NaN rows: no episode finished yet
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std = np.nanmean(curve, axis=1), np.nanstd(curve, axis=1)
    seeds = curve.shape[1]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(env_steps, mean, label=f"mean ± std over {seeds} seed{'s' * (seeds > 1)}")
    ax.fill_between(env_steps, mean - std, mean + std, alpha=0.3)
    if random_return is not None:
        ax.axhline(random_return, color="gray", ls="--", label="random policy")
    ax.set(xlabel="env steps (per seed)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def load_run(directory: str) -> tuple[Config, Any]:
    """The Config and params of a run (params leaves have a seed axis): params.msgpack of a
    finished run, else the last checkpoint's (a run stopped with Ctrl-C)."""
    cfg = load_config(directory, flag="--eval")
    path = os.path.join(directory, "params.msgpack")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return cfg, serialization.msgpack_restore(f.read())
    params = restore_params(dataclasses.replace(cfg, out=directory))
    if params is None:
        raise ValueError(f"--eval {directory!r}: no params.msgpack and no checkpoint in it")
    return cfg, jax.device_get(params)


def evaluate_run(
    directory: str, episodes: int = EVAL_EPISODES, greedy: bool = False, seed: int = 1234
) -> dict:
    """Reload a run and evaluate each seed's params on `episodes` fresh episodes (each env's
    first complete episode), with the random policy under the same rule; print one line.
    Returns {"returns": [S], "metrics": {name: [S]}, "random_return", "random_metrics"}."""
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    cfg, params = load_run(directory)
    algo = algorithm_module(cfg)
    setup = algo.make_env_and_network(cfg)
    evaluate = algo.make_evaluate(cfg, setup, episodes, greedy=greedy)
    over_seeds = algo.seed_map(cfg.num_seeds)
    keys = jax.random.split(jax.random.key(seed), cfg.num_seeds)
    metrics = jax.device_get(jax.jit(over_seeds(lambda pk: evaluate(*pk)))((params, keys)))
    random_eval = algo.make_evaluate(cfg, setup, episodes, random_policy=True)
    random = jax.device_get(jax.jit(random_eval)(None, jax.random.key(seed)))
    returns = np.asarray(metrics["episode_return"])
    what = "held-out-task return" if setup.eval_params is not None else "return"
    means = {k: float(np.mean(v)) for k, v in metrics.items() if k != "episodes"}
    print(
        f"{directory}: {cfg.env} | {cfg.memory} | mean {what} {returns.mean():.3f} ± "
        f"{returns.std():.3f}{_metric_text(means, skip=('episode_return',))} over "
        f"{cfg.num_seeds} seed(s) x {episodes} episodes, {'greedy' if greedy else 'sampled'} "
        f"actions (per seed: {', '.join(f'{r:.3f}' for r in returns)}; random policy "
        f"{float(random['episode_return']):.3f}"
        f"{_metric_text(random, skip=('episode_return',))})"
    )
    return dict(
        returns=returns.tolist(),
        metrics={k: np.asarray(v).tolist() for k, v in metrics.items()},
        random_return=float(random["episode_return"]),
        random_metrics={k: float(v) for k, v in random.items()},
    )


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

USAGE = """Recurrent PPO with a memory module (SHM, GRU, ...) on a jitted environment.

Other modes: `python train.py --resume DIR` continues the run in DIR from its last checkpoint;
`python train.py --eval DIR [--episodes N] [--greedy] [--seed S]` evaluates a run (each env's
first episode counts); `python train.py --list` prints every env id and memory name.
Several hosts: the same command on each, plus `--coordinator-address HOST:PORT --num-processes N
--process-id I` (or `--distributed` on Slurm, Open MPI, TPU pods); launch.py.
Memories: {memories}."""


def parse_config(argv: list[str], algo=None) -> Config:
    """Config from command-line flags (generated from the dataclass by tyro); `--preset NAME`
    picks the defaults the other flags then override (ValueError for an unknown NAME).
    `algo`: the algorithm module (default: train, PPO)."""
    import tyro

    algo = algorithm_module(algo)
    preset = "none"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    if preset not in algo.PRESETS:
        raise ValueError(
            f"unknown --preset {preset!r} for {algo.__name__}.py; choose one of "
            f"{', '.join(algo.PRESETS)}"
        )
    description = getattr(algo, "USAGE", USAGE).format(memories=", ".join(shm_jax.memory_names))
    return tyro.cli(algo.Config, default=algo.PRESETS[preset], args=argv, description=description)


def _parse_mode(argv: list[str], script: str = "train.py"):
    """argparse for the --eval / --resume modes (errors as ValueError, one line)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ValueError(message)

    parser = Parser(prog=f"python {script}", add_help=False)
    if argv[0] == "--eval":
        parser.add_argument("--eval", required=True, metavar="DIR")
        parser.add_argument("--episodes", type=int, default=EVAL_EPISODES)
        parser.add_argument("--greedy", action="store_true")
        parser.add_argument("--seed", type=int, default=1234)
    else:
        parser.add_argument("--resume", required=True, metavar="DIR")
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return parser.parse_args(argv)


def print_list() -> None:
    """Every env id and memory name."""
    import gymnax

    print(f"memories ({len(shm_jax.memory_names)}): {', '.join(shm_jax.memory_names)}")
    print(f"env ids ({len(envs.registered)}): {', '.join(envs.registered)}")
    print(f"gymnax env ids, also accepted ({len(gymnax.registered_envs)}): "
          f"{', '.join(gymnax.registered_envs)}")  # fmt: skip


def main(argv: list[str] | None = None, algo=None) -> None:
    """`python train.py [flags]` trains; `--resume DIR`, `--eval DIR`, `--list` (see USAGE).
    `algo`: the algorithm a new run uses ("ppo" / "train", the default, or "sac"); --resume and
    --eval follow the run's config.json. Bad input: one line on stderr, exit 2. Ctrl-C: one
    line, exit 130."""
    argv = sys.argv[1:] if argv is None else argv
    resume = False
    try:
        argv = launch.start(argv)  # strips the multi-host flags (`python train.py` joined first)
        algo = algorithm_module(algo)
        script = script_name(algo)
        if argv == ["--list"]:
            print_list()
            return
        if argv and argv[0] == "--eval":
            args = _parse_mode(argv, script)
            evaluate_run(args.eval, args.episodes, args.greedy, args.seed)
            return
        if argv and argv[0] == "--resume":
            args = _parse_mode(argv, script)
            cfg = dataclasses.replace(load_config(args.resume), out=args.resume)
            if args.progress is not None:
                cfg = dataclasses.replace(cfg, progress=args.progress)
            resume = True
        else:
            cfg = parse_config(argv, algo)
        algo = algorithm_module(cfg)  # a resumed run's own
        check_run(cfg, resume, algo)  # every user-input error surfaces here, before compiling
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        run(cfg, resume, algo)
    except RunInterrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        if stop.at_once:  # do not wait for the program still running in XLA's threads
            sys.stdout.flush()
            os._exit(130)
        sys.exit(130)


if __name__ == "__main__":
    main()
