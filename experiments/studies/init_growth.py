"""How large SHM's memory grows over one episode at initialisation, for each start: the paper's
Xavier-uniform Θ, |Xavier-uniform|, and |Xavier-uniform| with W_c at 0
(docs/findings/xavier-abs-overflow.md, docs/findings/bounded-start.md); and, with --runs, the
same for trained agents.

    python -m experiments.studies.init_growth [--envs VisualMatch-250 Wind-10-190 RepeatPreviousEasy]
        [--seeds 3] [--out results/calibration/init_growth.json]
    python -m experiments.studies.init_growth --runs RUN_DIR ... [--out results/calibration/trained_growth.json]

For each env, init and seed: a freshly initialised default agent (SHM, memory size 24 on the
credit-assignment tasks as in `experiments.suites`, else 32) acts for one episode, and the
largest |M_t| entry is recorded at t = 10, at mid-episode and at the last step
(`train.replay_episode` + `train.memory_trace`). Untrained agents, so this is the start that
training begins from, not where it ends. With --runs, each trained run's seeds play one episode
of the env they trained on (sampled actions and θ rows, as in training) and the same three
numbers are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import run
import train
from experiments import report

# (name, theta_init, calib_init)
INITS = (
    ("xavier", "xavier", "lecun"),
    ("xavier_abs", "xavier_abs", "lecun"),
    ("xavier_abs_c0", "xavier_abs", "zeros"),
)


def growth(env: str, init: str, seed: int, calib_init: str = "lecun") -> dict[str, float]:
    """Largest |M_t| entry of a fresh agent over one episode of `env`: at t = 10, mid, end."""
    size = 24 if env.startswith(("VisualMatch", "KeyToDoor")) else 32
    cfg = train.Config(
        env=env, memory="shm", memory_size=size, theta_init=init, calib_init=calib_init
    )
    cfg = dataclasses.replace(cfg, num_envs=1, num_minibatches=1)
    setup = train.make_env_and_network(cfg)
    key = jax.random.key(seed)
    obs, _ = setup.venv.reset(key)
    carry = setup.network.initialize_carry((1,))
    params = setup.network.init(
        key, carry, obs[None], jnp.ones((1, 1), bool), jnp.zeros((1, 1), jnp.int32)
    )
    return largest_memory(cfg, setup, params, key)


def largest_memory(cfg: train.Config, setup: train.Setup, params, key) -> dict[str, float]:
    """Largest |M_t| entry over one episode that `params` (one seed's) play: t = 10, mid, end."""
    episode = train.replay_episode(cfg, setup, params, key)
    M = train.memory_trace(setup, params, episode)["M"]
    largest = np.abs(M).reshape(len(M), -1).max(axis=1)
    return dict(
        t10=float(largest[min(10, len(M) - 1)]),
        mid=float(largest[len(M) // 2]),
        end=float(largest[-1]),
        length=len(M),
    )


def trained_growth(run_dir: str) -> list[dict[str, float]]:
    """`largest_memory` for each seed of a trained run (config.json + params), on its env."""
    cfg, params = run.load_run(run_dir)
    if not cfg.memory.startswith("shm"):
        raise ValueError(f"{run_dir}: memory {cfg.memory!r} has no SHM layer to measure")
    cfg = dataclasses.replace(cfg, num_envs=1, num_minibatches=1, num_seeds=1)
    setup = train.make_env_and_network(cfg)
    keys = jax.random.split(jax.random.key(1234), jax.tree.leaves(params)[0].shape[0])
    return [
        largest_memory(cfg, setup, train.one_seed(params, s), keys[s]) for s in range(len(keys))
    ]


def print_row(name: str, per_seed: list[dict[str, float]]) -> None:
    ends = ", ".join(f"{r['end']:.3g}" for r in per_seed)
    mids = ", ".join(f"{r['mid']:.3g}" for r in per_seed)
    print(
        f"{name} ({per_seed[0]['length']} steps): largest |M| mid-episode {mids}; at the end {ends}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m experiments.studies.init_growth", description=__doc__
    )
    p.add_argument(
        "--envs", nargs="+", default=["VisualMatch-250", "Wind-10-190", "RepeatPreviousEasy"]
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--runs", nargs="+", default=None, help="trained run dirs, instead of inits")
    p.add_argument(
        "--out", default=None, help="json (default results/calibration/init_growth.json)"
    )
    args = p.parse_args(argv)
    rows = []
    if args.runs:
        for run_dir in args.runs:
            per_seed = trained_growth(run_dir)
            rows.append(dict(run=os.path.normpath(run_dir), seeds=per_seed))
            print_row(run_dir, per_seed)
    else:
        for env in args.envs:
            for name, theta_init, calib_init in INITS:
                per_seed = [growth(env, theta_init, s, calib_init) for s in range(args.seeds)]
                rows.append(
                    dict(env=env, theta_init=theta_init, calib_init=calib_init, seeds=per_seed)
                )
                print_row(f"{env} {name}", per_seed)
    out = args.out or ("results/calibration/init_growth.json" if not args.runs else None)
    if out:
        report.write_atomic(out, json.dumps(rows, indent=2) + "\n")
        print(f"-> {out}")


if __name__ == "__main__":
    main()
