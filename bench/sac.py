"""Speed of sac.py at a preset's per-update sizes, and the projected time of its full budget.

    python bench/sac.py                                # meta-wind, shm and gru
    python bench/sac.py --preset meta-pointrobot --memory shm --quick
    python bench/sac.py --preset credit --env VisualMatch-250 --memory gru

For each memory: the preset's networks, batch (batch_size episodes of the env's horizon) and
rollouts per iteration, but only --updates gradient updates per timed iteration. It times,
after compiling each: one iteration's rollouts (`run_episodes`), one held-out evaluation, and
--iters training iterations (rollouts + --updates updates) of one seed; the gradient update's
time is the iteration's minus its rollouts', divided by --updates. The projection is the preset's
budget: num_iters x (rollouts + updates_per_iter updates) plus its evaluations, one seed (seeds
run one after another on a single CPU device, `train.seed_map`). Prints the environment and a
markdown table.
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

import sac


def environment() -> str:
    return (
        f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}, "
        f"CPU count {os.cpu_count()}, {platform.processor() or platform.machine()}"
    )


def timed(fn, *args, repeat: int = 1) -> tuple[float, float]:
    """(compile_s, seconds per call) of jax.jit(fn)(*args), the call timed `repeat` times."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm
    t0 = time.perf_counter()
    for _ in range(repeat):
        jax.block_until_ready(compiled(*args))
    return compile_s, (time.perf_counter() - t0) / repeat


def measure(cfg: sac.Config, updates: int, iters: int) -> dict:
    """Seconds per rollout phase, per evaluation, per gradient update, and the compile time."""
    budget = cfg
    cfg = dataclasses.replace(
        cfg,
        num_seeds=1,
        updates_per_iter=updates,
        update_ratio=0.0,
        random_rollouts=cfg.rollouts_per_iter,
        num_iters=iters + 1,
        eval_every=10**9,  # no evaluation inside the timed iterations
    )
    setup = sac.make_env_and_network(cfg)
    program = sac.make_train(cfg)
    keys = sac.make_keys(cfg)
    runner = jax.block_until_ready(jax.jit(program.init)(keys))
    one = lambda r: program.updates(r, 1)
    segment = jax.jit(one).lower(runner).compile()
    runner, _ = jax.block_until_ready(segment(runner))  # the random iteration fills the buffer
    runner, _ = jax.block_until_ready(segment(runner))  # warm
    t0 = time.perf_counter()
    for _ in range(iters):
        runner, _ = jax.block_until_ready(segment(runner))
    iteration_s = (time.perf_counter() - t0) / iters

    params = jax.tree.map(lambda x: x[0], runner.params)
    key = jax.random.key(1)
    collect = lambda p, k: sac.run_episodes(
        setup, p["actor"], k, setup.env_params, cfg.rollouts_per_iter, "sample", cfg
    )
    _, collect_s = timed(collect, params, key, repeat=3)
    eval_s = float("nan")
    if setup.eval_params is not None:
        _, eval_s = timed(sac.make_evaluate(cfg, setup, greedy=True), params, key)
    update_s = max(iteration_s - collect_s, 0.0) / updates
    n_evals = -(-budget.num_updates // budget.eval_every) if setup.eval_params is not None else 0
    full_s = budget.num_iters * (collect_s + budget.grad_updates * update_s)
    full_s += n_evals * (0.0 if eval_s != eval_s else eval_s)
    return dict(
        collect_s=collect_s,
        eval_s=eval_s,
        update_s=update_s,
        iteration_s=collect_s + budget.grad_updates * update_s,
        full_h=full_s / 3600,
        env_steps_per_s=cfg.steps_per_update / collect_s,
        updates_per_s=1.0 / update_s if update_s > 0 else float("inf"),
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", default="meta-wind", choices=sorted(sac.PRESETS))
    parser.add_argument("--env", default=None, help="env id (default: the preset's)")
    parser.add_argument("--memory", default="shm,gru", help="comma-separated memory names")
    parser.add_argument("--updates", type=int, default=20, help="updates per timed iteration")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations")
    parser.add_argument("--quick", action="store_true", help="--updates 5 --iters 2")
    args = parser.parse_args()
    if args.quick:
        args.updates, args.iters = 5, 2
    print(environment())
    base = sac.PRESETS[args.preset]
    if args.env:
        base = dataclasses.replace(base, env=args.env)
    print(
        f"\n{args.preset} on {base.env}: batch {base.batch_size} x {base.horizon + 1} steps, "
        f"{base.rollouts_per_iter} rollouts and {base.grad_updates} updates per iteration, "
        f"{base.num_iters} iterations ({base.num_iters * base.grad_updates:,} updates, "
        f"{base.num_updates * base.steps_per_update:,} env steps); timed with {args.updates} "
        f"updates x {args.iters} iterations\n"
    )
    print(
        "| memory (size) | s / update | updates/s | s / iteration | rollouts: env steps/s "
        "| s / eval | full budget, 1 seed (h) |"
    )
    print("|---|---|---|---|---|---|---|")
    for memory in args.memory.split(","):
        cfg = dataclasses.replace(base, memory=memory)
        m = measure(cfg, args.updates, args.iters)
        print(
            f"| {memory} ({cfg.mem_size}) | {m['update_s']:.4f} | {m['updates_per_s']:.1f} "
            f"| {m['iteration_s']:.2f} | {m['env_steps_per_s']:,.0f} | {m['eval_s']:.2f} "
            f"| {m['full_h']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
