"""How large SHM's memory grows over one episode at initialisation, for each Θ init: the paper's
Xavier-uniform against |Xavier-uniform| (README, "The |Xavier| start overflows on long episodes").

    python -m experiments.init_growth [--envs VisualMatch-250 Wind-10-190 RepeatPreviousEasy]
        [--seeds 3] [--out results/calibration/init_growth.json]

For each env, init and seed: a freshly initialised default agent (SHM, memory size 24 on the
credit-assignment tasks as in `experiments.suites`, else 32) acts for one episode, and the
largest |M_t| entry is recorded at t = 10, at mid-episode and at the last step
(`train.replay_episode` + `train.memory_trace`). Untrained agents, so this is the start that
training begins from, not where it ends.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import train
from experiments import report

INITS = ("xavier", "xavier_abs")


def growth(env: str, init: str, seed: int) -> dict[str, float]:
    """Largest |M_t| entry of a fresh agent over one episode of `env`: at t = 10, mid, end."""
    size = 24 if env.startswith(("VisualMatch", "KeyToDoor")) else 32
    cfg = train.Config(env=env, memory="shm", memory_size=size, theta_init=init, num_envs=1)
    cfg = train.dataclasses.replace(cfg, num_minibatches=1)
    setup = train.make_env_and_network(cfg)
    key = jax.random.key(seed)
    obs, _ = setup.venv.reset(key)
    carry = setup.network.initialize_carry((1,))
    params = setup.network.init(
        key, carry, obs[None], jnp.ones((1, 1), bool), jnp.zeros((1, 1), jnp.int32)
    )
    episode = train.replay_episode(cfg, setup, params, key)
    M = train.memory_trace(setup, params, episode)["M"]
    largest = np.abs(M).reshape(len(M), -1).max(axis=1)
    return dict(
        t10=float(largest[min(10, len(M) - 1)]),
        mid=float(largest[len(M) // 2]),
        end=float(largest[-1]),
        length=len(M),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.init_growth", description=__doc__)
    p.add_argument(
        "--envs", nargs="+", default=["VisualMatch-250", "Wind-10-190", "RepeatPreviousEasy"]
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="results/calibration/init_growth.json")
    args = p.parse_args(argv)
    rows = []
    for env in args.envs:
        for init in INITS:
            per_seed = [growth(env, init, s) for s in range(args.seeds)]
            rows.append(dict(env=env, theta_init=init, seeds=per_seed))
            ends = ", ".join(f"{r['end']:.3g}" for r in per_seed)
            mids = ", ".join(f"{r['mid']:.3g}" for r in per_seed)
            print(
                f"{env} ({per_seed[0]['length']} steps) {init}: largest |M| mid-episode "
                f"{mids}; at the end {ends}"
            )
    report.write_atomic(args.out, json.dumps(rows, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
