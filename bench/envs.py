"""Env steps per second: 1024 envs under jit + vmap through the training auto-reset (`VecEnv`),
beside the `popgym` package's own single-process steps per second, measured in the same run.

    python bench/envs.py                       # every id in envs.registered
    python bench/envs.py --quick --envs Repeat Battleship
"""

import pathlib
import sys

# Run as `python bench/<name>.py`: put the repo root first on the path, not bench/ (whose envs.py
# and train.py would shadow the `envs` package and `train.py`).
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])


import argparse
import importlib
import os
import pkgutil
import time

import jax
import numpy as np

import envs


def popgym_class(env_id):
    """popgym's class of the same name (or its alias target), or None."""
    import popgym.envs

    name = env_id.replace("Stateless", "PositionOnly")
    for info in pkgutil.iter_modules(popgym.envs.__path__):
        try:
            module = importlib.import_module(f"popgym.envs.{info.name}")
        except ImportError:  # the labyrinths need mazelib, which we don't install
            continue
        if hasattr(module, name):
            return getattr(module, name)
    return None


def popgym_steps_per_s(cls, seconds: float) -> float:
    env = cls()
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps += 1
        if terminated or truncated:
            env.reset(seed=int(rng.integers(1 << 30)))
    return steps / (time.perf_counter() - t0)


def jax_steps_per_s(env_id: str, num_envs: int, num_steps: int, repeats: int) -> float:
    env, params = envs.make(env_id)
    venv = envs.VecEnv(env, params, num_envs)
    # long enough that every episode ends (and auto-resets) at least once: the big decks
    # (RepeatFirstHard: 831 steps) would otherwise never pay for a reset in the timed run
    num_steps = min(max(num_steps, int(params.max_steps_in_episode) + 1), 1000)

    def run(state, key):
        def body(state, k):
            ka, ks = jax.random.split(k)
            action = jax.vmap(venv.action_space.sample)(jax.random.split(ka, num_envs))
            obs, state, reward, done, info = venv.step(ks, state, action)
            return state, reward.sum() + done.sum()

        return jax.lax.scan(body, state, jax.random.split(key, num_steps))[1].sum()

    run = jax.jit(run)
    _, state = jax.jit(venv.reset)(jax.random.PRNGKey(0))  # the first reset is not timed
    jax.block_until_ready(run(state, jax.random.PRNGKey(0)))
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(state, jax.random.PRNGKey(i + 1)))
        times.append(time.perf_counter() - t0)
    return num_envs * num_steps / float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", nargs="*", default=None, help="substrings of ids to keep")
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument("--num-envs", type=int, default=1024)
    args = parser.parse_args()
    ids = [i for i in envs.registered if not args.envs or any(s in i for s in args.envs)]
    num_steps, repeats, seconds = (220, 1, 0.5) if args.quick else (420, 3, 2.0)

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs")
    print(
        f"{args.num_envs} envs x max({num_steps}, episode length + 1) steps (at most 1000) "
        "through envs.VecEnv, random actions"
    )
    print()
    print("| env | JAX steps/s | popgym steps/s | ratio |")
    print("|---|---:|---:|---:|")
    for env_id in ids:
        ours = jax_steps_per_s(env_id, args.num_envs, num_steps, repeats)
        cls = popgym_class(env_id)
        ref = popgym_steps_per_s(cls, seconds) if cls is not None else float("nan")
        ratio = f"{ours / ref:,.0f}x" if cls is not None else "-"
        ref_s = f"{ref:,.0f}" if cls is not None else "-"
        print(f"| {env_id} | {ours:,.0f} | {ref_s} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
