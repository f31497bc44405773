"""End-to-end training benchmarks of train.py (prints markdown tables and the environment).

    python bench/train.py throughput        # env steps/s of SHM (H=32) vs GRU (256), same config
    python bench/train.py to-threshold      # env steps and wall time for SHM to reach 0.9 on
                                            # RepeatFirstEasy, 3 seeds
    python bench/train.py paper shm:128:pallas:3 gru:256:16:3   # env steps/s of the paper's
        # POPGym config (--preset paper-popgym), one row per memory:size:method-or-unroll:seeds
        # (SHM: a --memory-method; GRU: a --memory-unroll), --updates updates each; then where
        # an update's time goes
    python bench/train.py paper --quick     # the same at a tiny config (CPU, tens of seconds)

Compile time is measured apart (AOT: `jax.jit(train).lower(keys).compile()`), then the compiled
run is timed to completion.

`paper`'s breakdown splits one update (the median wall time of the run's updates after the
first) into the rollout (acting:
`train.rollout` over the seeds, compiled and timed alone) and the rest (GAE and the PPO epochs
× minibatches), and within the rest the memory's forward+backward alone: the memory layer on
one minibatch's shapes ([T, envs / minibatches, its input width], read off the network), over
the seeds as the training maps them (`train.seed_map`), times epochs × minibatches. "other" is
what is left: the rest of the network (embeddings, heads), the loss, the optimiser and GAE. The
parts are timed apart, so they need not add up exactly to the whole.
"""

import pathlib
import sys

# Run as `python bench/<name>.py`: put the repo root first on the path, not bench/ (whose envs.py
# and train.py would shadow the `envs` package and `train.py`).
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])


import argparse
import dataclasses
import functools
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
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


QUICK = dict(num_envs=8, num_steps=32, num_epochs=2, num_minibatches=2)  # paper --quick


def paper(args) -> None:
    """Env steps/s of `--preset paper-popgym` on RepeatPreviousEasy, per row spec, then where an
    update's time goes for each row (module docstring)."""
    base = dataclasses.replace(
        train.PRESETS["paper-popgym"],
        env="RepeatPreviousEasy",
        memory_size_auto=False,
        matmul_precision=args.matmul_precision,
        progress=False,
        **(QUICK if args.quick else {}),
    )
    base = dataclasses.replace(base, total_timesteps=args.updates * base.steps_per_update)
    rows = args.rows or (["shm:16:auto:1"] if args.quick else ["shm:128:auto:3", "gru:64:16:3"])
    configs = []
    for spec in rows:
        try:
            memory, size, how, seeds = spec.split(":")
            size, seeds = int(size), int(seeds)
        except ValueError:
            raise SystemExit(f"row {spec!r}: write memory:size:method-or-unroll:seeds, "
                             "e.g. shm:128:pallas:3 or gru:256:16:3") from None  # fmt: skip
        knob = {"memory_unroll": int(how)} if memory == "gru" else {"memory_method": how}
        cfg = dataclasses.replace(base, memory=memory, memory_size=size, num_seeds=seeds, **knob)
        try:
            train.validate(cfg)
        except ValueError as err:
            raise SystemExit(f"row {spec!r}: {err}") from None
        configs.append((how, cfg))
    print(f"Config: --preset paper-popgym{' (--quick: smaller)' if args.quick else ''}, "
          f"{base.env}, {base.num_envs} envs x {base.num_steps} steps, {base.num_epochs} epochs "
          f"x {base.num_minibatches} minibatches, {args.updates} updates, matmul precision "
          f"{base.matmul_precision}")  # fmt: skip
    print()
    print("| memory | size | method / unroll | seeds | compile (s) | run (s) | env steps/s |")
    print("|---|---|---|---|---|---|---|")
    parts = []
    for how, cfg in configs:
        compile_s, run_s, _, walls = timed_run(cfg)
        sps = cfg.num_updates * cfg.steps_per_update * cfg.num_seeds / run_s
        form = shm_form(cfg) if cfg.memory.startswith("shm") else how
        print(f"| {cfg.memory} | {cfg.memory_size} | {form} | {cfg.num_seeds} | {compile_s:.1f} "
              f"| {run_s:.1f} | {sps:,.0f} |", flush=True)  # fmt: skip
        # One update: the median of the updates after the first, whose time includes the
        # program's first-run costs (with one update, the run's time).
        update_s = float(np.median(np.diff(walls))) if len(walls) > 1 else run_s
        parts.append((cfg, form, update_s))
    print()
    print("Where an update's time goes (seconds per update, all seeds; share of the update):")
    print()
    print("| memory | size | method / unroll | seeds | update (s) | rollout | GAE + PPO epochs "
          "| of which memory fwd+bwd | of which other |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for cfg, form, update_s in parts:
        rollout_s, memory_s = update_breakdown(cfg)
        rest_s = update_s - rollout_s
        share = lambda t: f"{t:.3f} ({100 * t / update_s:.0f}%)"
        print(f"| {cfg.memory} | {cfg.memory_size} | {form} | {cfg.num_seeds} | {update_s:.3f} "
              f"| {share(rollout_s)} | {share(rest_s)} | {share(memory_s)} "
              f"| {share(rest_s - memory_s)} |", flush=True)  # fmt: skip
    print()
    print(environment())


def timed(fn, *args, repeats: int = 3) -> float:
    """Median seconds of a compiled fn(*args), after a warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def memory_input(setup: train.Setup, params, carry, obs, reset, aux) -> jax.ShapeDtypeStruct:
    """The shape and dtype of what the network feeds its memory, x [T, B, d], read off an
    abstract evaluation of the network."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if context.module is not None and type(context.module) is type(setup.memory):
            if context.method_name == "__call__":
                seen.append(jax.ShapeDtypeStruct(args[1].shape, args[1].dtype))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(setup.network.apply, params, carry, obs, reset, aux)
    if not seen:
        raise RuntimeError(f"{type(setup.network).__name__} never called its memory")
    return seen[0]


def update_breakdown(cfg: train.Config) -> tuple[float, float]:
    """(seconds of one update's rollout, seconds of its memory forward+backward passes), all
    seeds, each compiled and timed alone (module docstring)."""
    setup = train.make_env_and_network(cfg)
    program = train.make_train(cfg)
    keys = train.make_keys(cfg)
    S, N, T = cfg.num_seeds, cfg.num_envs, cfg.num_steps
    over_seeds = train.seed_map(S)
    precise = functools.partial(train.with_matmul_precision, cfg.matmul_precision)
    runner = jax.jit(program.init)(keys)

    def rollout(runner):
        return over_seeds(lambda r: train.rollout(setup, r, setup.venv, T))(runner)

    rollout_s = timed(jax.jit(precise(rollout)).lower(runner).compile(), runner)

    # The memory alone on one minibatch: x [T, N / M, d] as the network feeds it.
    B = N // cfg.num_minibatches
    one = jax.tree.map(lambda a: a[0], runner)
    obs = jnp.zeros((T, N, *one.obs.shape[1:]), one.obs.dtype)
    aux = setup.memory.sample_aux(jax.random.key(0), (T, N))
    x_spec = memory_input(setup, one.params, one.carry, obs, jnp.zeros((T, N), bool), aux)
    memory = setup.memory

    def init(key):
        kx, kp, ka = jax.random.split(key, 3)
        x = jax.random.normal(kx, (T, B, x_spec.shape[-1]), x_spec.dtype)
        resets = jax.random.bernoulli(ka, 0.01, (T, B))
        carry = memory.initialize_carry((B,))
        aux = memory.sample_aux(ka, (T, B))
        return memory.init(kp, carry, x, resets, aux), (carry, x, resets, aux)

    def fwd_bwd(state):
        params, (carry, x, resets, aux) = state

        def loss(params, x):
            y = memory.apply(params, carry, x, resets, aux)[1]
            return jnp.sum(y * jnp.cos(y))  # a cotangent that varies, as a real loss gives

        return jax.grad(loss, argnums=(0, 1))(params, x)

    state = jax.jit(over_seeds(init))(keys)
    step = jax.jit(precise(over_seeds(fwd_bwd))).lower(state).compile()
    memory_s = timed(step, state) * cfg.num_epochs * cfg.num_minibatches
    return rollout_s, memory_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("mode", choices=["throughput", "to-threshold", "paper"])
    parser.add_argument("rows", nargs="*", help="paper: memory:size:method-or-unroll:seeds")
    parser.add_argument("--updates", type=int, default=None, help="paper: updates per row (2)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"paper: a tiny config ({QUICK}), default row shm:16:auto:1 (for a CPU)",
    )
    parser.add_argument(
        "--matmul-precision", default="highest", choices=["highest", "high", "default"]
    )
    parser.add_argument("--timesteps", type=int, default=None, help="env steps per run")
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_intermixed_args()  # rows may come after the flags, too
    if args.updates is None:
        args.updates = 2
    if args.updates < 1:
        parser.error(f"--updates must be >= 1; got {args.updates}")
    if args.timesteps is None:
        args.timesteps = 64 * 128 * 20 if args.mode == "throughput" else 2_000_000
    modes = {"throughput": throughput, "to-threshold": to_threshold, "paper": paper}
    modes[args.mode](args)


if __name__ == "__main__":
    main()
