"""End-to-end training benchmarks of train.py (prints markdown tables and the environment).

    python bench/train.py throughput        # env steps/s of SHM (H=32) vs GRU (256), same config
    python bench/train.py to-threshold      # env steps and wall time for SHM to reach 0.9 on
                                            # RepeatFirstEasy, 3 seeds
    python bench/train.py paper shm:128:pallas:3 gru:256:16:3   # env steps/s of the paper's
        # POPGym config (--preset paper-popgym), one row per memory:size:method-or-unroll:seeds
        # (SHM: a --memory-method; GRU: a --memory-unroll), --updates updates each

Compile time is measured apart (AOT: `jax.jit(train).lower(keys).compile()`), then the compiled
run is timed to completion.
"""

import pathlib
import sys

# Run as `python bench/<name>.py`: put the repo root first on the path, not bench/ (whose envs.py
# and train.py would shadow the `envs` package and `train.py`).
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])


import argparse
import dataclasses
import os
import platform
import time

import jax
import numpy as np

import run
import train
from shm_jax.shm import layer_method


def environment() -> str:
    return (
        f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}, "
        f"CPU count {os.cpu_count()}, {platform.processor() or platform.machine()}"
    )


def timed_run(cfg: train.Config):
    """(compile_s, run_s, metrics, per-update wall times [U]) of one compiled run."""
    setup = train.make_env_and_network(cfg)
    progress = run.Progress(cfg, run.headline_metric(setup), show=False)
    train_fn = train.make_train(cfg, progress)
    keys = train.make_keys(cfg)
    t0 = time.perf_counter()
    compiled = jax.jit(train_fn).lower(keys).compile()
    compile_s = time.perf_counter() - t0
    progress.start()
    t0 = time.perf_counter()
    _, metrics = jax.block_until_ready(compiled(keys))
    run_s = time.perf_counter() - t0
    walls = np.array([progress.times.get(u, np.nan) for u in range(1, cfg.num_updates + 1)])
    return compile_s, run_s, jax.device_get(metrics), walls - progress.start_time


def shm_form(cfg) -> str:
    """The form SHM's update runs for cfg's minibatches (what "auto" resolves to)."""
    if cfg.memory_method != "auto":
        return cfg.memory_method
    batch = cfg.num_envs // cfg.num_minibatches
    return f"auto = {layer_method(cfg.num_steps, batch, cfg.memory_size, fused=True)}"


def throughput(args) -> None:
    base = train.Config(
        env="RepeatPreviousEasy",
        total_timesteps=args.timesteps,
        num_envs=64,
        num_steps=128,
        num_epochs=4,
        num_minibatches=4,
        progress=False,
    )
    print(f"Config: {base.env}, {base.num_envs} envs x {base.num_steps} steps, "
          f"{base.num_epochs} epochs x {base.num_minibatches} minibatches, "
          f"{base.total_timesteps:,} steps, 1 seed")  # fmt: skip
    print()
    print("| memory | size | SHM form | compile (s) | run (s) | env steps/s | final return |")
    print("|---|---|---|---|---|---|---|")
    rows = [("shm", 32, "auto"), ("shm", 32, "sequential"), ("gru", 256, "auto")]
    for memory, size, method in rows:
        cfg = dataclasses.replace(base, memory=memory, memory_size=size, memory_method=method)
        compile_s, run_s, metrics, _ = timed_run(cfg)
        sps = cfg.num_updates * cfg.steps_per_update / run_s
        final = np.nanmean(metrics["episode_return"][-max(1, cfg.num_updates // 10) :])
        form = shm_form(cfg) if memory == "shm" else ""
        print(
            f"| {memory} | {size} | {form} | {compile_s:.1f} | {run_s:.1f} | {sps:,.0f} "
            f"| {final:.3f} |"
        )
    print()
    print(environment())


def to_threshold(args) -> None:
    cfg = train.Config(
        env="RepeatFirstEasy",
        memory="shm",
        total_timesteps=args.timesteps,
        num_seeds=3,
        progress=False,
    )
    compile_s, run_s, metrics, walls = timed_run(cfg)
    curve = metrics["episode_return"]  # [U, S]
    print(f"SHM (H={cfg.memory_size}) on {cfg.env}, 3 seeds, default train.py config, "
          f"threshold mean episode return >= {args.threshold}")  # fmt: skip
    print()
    print("| seed | env steps to threshold | wall time to threshold (s) | final return |")
    print("|---|---|---|---|")
    for s in range(cfg.num_seeds):
        hit = np.flatnonzero(curve[:, s] >= args.threshold)
        final = np.nanmean(curve[-max(1, cfg.num_updates // 10) :, s])
        if len(hit):
            u = hit[0]
            steps = (u + 1) * cfg.steps_per_update
            print(f"| {s} | {steps:,} | {walls[u]:.1f} | {final:.3f} |")
        else:
            print(f"| {s} | not reached in {cfg.total_timesteps:,} | - | {final:.3f} |")
    print()
    print(f"compile {compile_s:.1f} s (apart), run {run_s:.1f} s for all 3 seeds together")
    print(environment())


def paper(args) -> None:
    """Env steps/s of `--preset paper-popgym` on RepeatPreviousEasy, per row spec."""
    base = dataclasses.replace(
        train.PRESETS["paper-popgym"],
        env="RepeatPreviousEasy",
        memory_size_auto=False,
        matmul_precision=args.matmul_precision,
        progress=False,
    )
    base = dataclasses.replace(base, total_timesteps=args.updates * base.steps_per_update)
    print(f"Config: --preset paper-popgym, {base.env}, {base.num_envs} envs x {base.num_steps} "
          f"steps, {base.num_epochs} epochs x {base.num_minibatches} minibatches, "
          f"{args.updates} updates, matmul precision {base.matmul_precision}")  # fmt: skip
    print()
    print("| memory | size | method / unroll | seeds | compile (s) | run (s) | env steps/s |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.rows:
        try:
            memory, size, how, seeds = spec.split(":")
            size, seeds = int(size), int(seeds)
        except ValueError:
            raise SystemExit(f"row {spec!r}: write memory:size:method-or-unroll:seeds, "
                             "e.g. shm:128:pallas:3 or gru:256:16:3") from None  # fmt: skip
        knob = {"memory_unroll": int(how)} if memory == "gru" else {"memory_method": how}
        cfg = dataclasses.replace(base, memory=memory, memory_size=size, num_seeds=seeds, **knob)
        train.validate(cfg)
        compile_s, run_s, _, _ = timed_run(cfg)
        sps = cfg.num_updates * cfg.steps_per_update * seeds / run_s
        print(f"| {memory} | {size} | {how} | {seeds} | {compile_s:.1f} | {run_s:.1f} "
              f"| {sps:,.0f} |", flush=True)  # fmt: skip
    print()
    print(environment())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("mode", choices=["throughput", "to-threshold", "paper"])
    parser.add_argument("rows", nargs="*", help="paper: memory:size:method-or-unroll:seeds")
    parser.add_argument("--updates", type=int, default=2, help="paper: updates per row")
    parser.add_argument(
        "--matmul-precision", default="highest", choices=["highest", "high", "default"]
    )
    parser.add_argument("--timesteps", type=int, default=None, help="env steps per run")
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    if args.timesteps is None:
        args.timesteps = 64 * 128 * 20 if args.mode == "throughput" else 2_000_000
    modes = {"throughput": throughput, "to-threshold": to_threshold, "paper": paper}
    modes[args.mode](args)


if __name__ == "__main__":
    main()
