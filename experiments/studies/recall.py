"""What a trained RepeatPrevious policy answers: which earlier card its action names.

    python -m experiments.studies.recall RUN_DIR [RUN_DIR ...] [--episodes 64] [--max-lag 6] [--out F]

RepeatPrevious pays for naming the suit of the card shown k − 1 steps before the current one
(k = 4 on Easy, `shared/spec/envs.md`). A policy on a plateau can be half right in more than one
way: it may recall the right card in only some steps, or recall the cards of about the right
time without telling them apart. For each seed of each run, the policy acts for `--episodes`
episodes (`train.replay_episode`, sampled actions and θ rows as in training) and, over the steps
that are scored, we record:
- `accuracy`: the share of scored steps whose action is right (chance 0.25);
- `lag_match[j]`: the share whose action names the suit shown j steps before the current step
  (j = 0: the current card). The target's lag is the j where it equals `accuracy`; by chance
  any other lag matches 0.25;
- `confusion[target][action]`: counts.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

import run
import train
from experiments import report
from experiments.studies import memory_inputs


def recall_statistics(ep: dict, k: int, max_lag: int) -> dict:
    """The statistics above from one replay (`train.replay_episode`'s dict); `k` is the env's."""
    suit = np.argmax(np.asarray(ep["obs"])[:, :4], -1)  # the suit one-hot comes first
    action = np.asarray(ep["action"]).reshape(-1)
    reward = np.asarray(ep["reward"])
    episode = np.asarray(ep["episode"])
    t = memory_inputs.step_index(np.asarray(ep["reset"], bool))  # step index in the episode
    scored = reward != 0
    lag = k - 1
    target_rows = np.flatnonzero(scored & (t >= lag))
    if len(target_rows) != scored.sum():
        raise ValueError(f"scored steps before step {lag} of an episode: is k = {k} right?")
    target = suit[target_rows - lag]
    chosen = action[target_rows]
    right = reward[target_rows] > 0
    if not np.array_equal(right, chosen == target):
        raise ValueError(f"the env's reward does not pay for the suit {lag} steps back (k = {k})")
    lag_match = []
    for j in range(max_lag + 1):
        rows = target_rows[t[target_rows] >= j]
        same = episode[rows - j] == episode[rows]
        lag_match.append(float(np.mean(action[rows[same]] == suit[rows[same] - j])))
    confusion = np.zeros((4, 4), np.int64)
    np.add.at(confusion, (target, chosen), 1)
    return dict(
        accuracy=float(right.mean()),
        lag_match=lag_match,
        confusion=confusion.tolist(),
        scored_steps=int(len(target_rows)),
    )


def run_statistics(run_dir: str, episodes: int, max_lag: int) -> list[dict]:
    """Per seed of the run in `run_dir` (its config and trained or last checkpointed params)."""
    cfg, params = run.load_run(run_dir)
    if not cfg.env.startswith("RepeatPrevious"):
        raise ValueError(f"{run_dir} trained on {cfg.env}; this diagnostic is for RepeatPrevious*")
    setup = train.make_env_and_network(cfg)
    keys = train.make_keys(cfg)
    out = []
    for s in range(cfg.num_seeds):
        key = jax.random.fold_in(keys[s], 2)
        ep = train.replay_episode(cfg, setup, train.one_seed(params, s), key, episodes)
        out.append(recall_statistics(ep, setup.env.k, max_lag))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m experiments.studies.recall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="run directories (train.py --out)")
    p.add_argument("--episodes", type=int, default=64, help="episodes per seed")
    p.add_argument("--max-lag", type=int, default=6, help="lags 0..max-lag")
    p.add_argument("--out", default=None, help="json of every run's statistics (updated per run)")
    args = p.parse_args(argv)
    rows = report.read_json(args.out) if args.out else {}
    lags = " | ".join(f"lag {j}" for j in range(args.max_lag + 1))
    print(f"| run | accuracy | {lags} |")
    print("|---|---:|" + "---:|" * (args.max_lag + 1))
    for run_dir in args.runs:
        if not os.path.isfile(os.path.join(run_dir, "config.json")):
            raise SystemExit(f"error: {run_dir!r} is not a run directory (no config.json)")
        try:
            stats = run_statistics(run_dir, args.episodes, args.max_lag)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        rows[os.path.normpath(run_dir)] = stats

        def fmt(values):
            return f"{np.mean(values):.2f} ± {np.std(values):.2f}"

        lag_cols = " | ".join(
            fmt([s["lag_match"][j] for s in stats]) for j in range(args.max_lag + 1)
        )
        acc = fmt([s["accuracy"] for s in stats])
        print(f"| {run_dir} | {acc} | {lag_cols} |", flush=True)
        if args.out:
            report.write_atomic(args.out, json.dumps(rows, indent=2) + "\n")
    if args.out:
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
