"""How much of what the SHM layer sees changes from step to step: a diagnostic for the
`paper_agent` suite (docs/findings/memory-inputs.md; the suite itself:
docs/findings/paper-agent-ablation.md).

    python -m experiments.studies.memory_inputs [--suite-results results/paper_agent] \\
        [--runs runs/grid/paper_agent] [--episodes 16] [--out results/paper_agent/memory_inputs.json]

SHM reads y_t = M_t q_t with M_t = Σ_s (Π C) ⊙ (η_s v_s) k_sᵀ, so the weight the read gives to
step s is about k_s · q_t. To recall one earlier step, keys must differ from step to step. A
component of the layer's input that is the same at every step (a bias, say) pushes every key
towards one direction. For each cell of the suite and each seed, at initialisation (fresh
params from the cell's config and seed) and, where its scratch run is there, after training
(its params.msgpack), the agent acts for `--episodes` episodes (`train.replay_episode`), and we
record, from the layer's own vectors (`SHM.vectors`):
- `const_x`: ‖mean_t x̂_t‖² / mean_t ‖x̂_t‖², the share of the normalised input x̂_t that is
  constant over all steps (0: none; 1: the input never changes);
- `obs_share`, `time_share`: the share of x̂_t's variance explained by the current observation
  (the group means over steps that saw the same observation), and by the step index t in the
  episode: what the layer has to write, and where in the episode it is;
- `key_cos`: the mean cosine similarity of the keys k_s, k_t of two different steps of one
  episode (1: one key for every step, so the read cannot pick out a step).
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

WHEN = ("init", "trained")


def statistics(cfg: train.Config, setup: train.Setup, trace, params, key, episodes: int) -> dict:
    """const_x, obs_share, time_share and key_cos of one seed's params over `episodes` episodes
    it plays; `trace` is `train.make_memory_trace(setup, method="vectors")`, built once."""
    ep = train.replay_episode(cfg, setup, params, key, num_episodes=episodes)
    seq = [jnp.asarray(ep[k])[:, None] for k in ("obs", "reset", "aux")]
    _, vec = trace(params, setup.network.initialize_carry((1,)), *seq)
    x_hat = np.asarray(vec["x_hat"][:, 0], np.float64)  # [T, d]
    k = np.asarray(vec["k"][:, 0], np.float64)  # [T, H]
    const_x = float(np.sum(x_hat.mean(0) ** 2) / np.mean(np.sum(x_hat**2, -1)))
    obs_rows = np.unique(ep["obs"], axis=0, return_inverse=True)[1].reshape(-1)
    shares = {
        "obs_share": explained(x_hat, obs_rows),
        "time_share": explained(x_hat, step_index(ep["reset"])),
    }
    cos = []
    for e in np.unique(ep["episode"]):
        ke = k[ep["episode"] == e]
        ke = ke / np.maximum(np.linalg.norm(ke, axis=-1, keepdims=True), 1e-12)
        n, sim = len(ke), ke @ ke.T
        if n > 1:
            cos.append((sim.sum() - np.trace(sim)) / (n * (n - 1)))
    return dict(const_x=const_x, key_cos=float(np.mean(cos)), **shares)


def step_index(reset: np.ndarray) -> np.ndarray:
    """t [T], the step index inside the episode of a replay's steps (reset [T] bool)."""
    t = train.episode_step(jnp.zeros((1,), jnp.int32), jnp.asarray(reset)[:, None])
    return np.asarray(t)[:, 0]


def explained(x: np.ndarray, groups: np.ndarray) -> float:
    """The share of the variance of x [N, d] (about its mean) that the group means explain."""
    centred = x - x.mean(0)
    total = np.sum(centred**2)
    between = 0.0
    for g in np.unique(groups):
        rows = centred[groups == g]
        between += len(rows) * np.sum(rows.mean(0) ** 2)
    return float(between / total)


def cell_statistics(results_dir: str, scratch_dir: str, episodes: int, with_trained=True) -> dict:
    """{"init": [per seed], "trained": [per seed, or empty without the scratch run]} for one
    cell: the seeds' keys as the run drew them, init params as `make_train` draws them."""
    cfg = run.load_config(results_dir)
    keys = train.make_keys(cfg)
    small = dataclasses.replace(cfg, num_seeds=1, progress=False)
    setup = train.make_env_and_network(small)
    trained = None
    if with_trained and os.path.exists(os.path.join(scratch_dir, "params.msgpack")):
        trained = run.load_run(scratch_dir)[1]
    init_fn = jax.jit(train.make_train(small).init)
    trace = train.make_memory_trace(setup, method="vectors")  # one compile for the cell
    out = {"init": [], "trained": []}
    for s in range(cfg.num_seeds):
        replay_key = jax.random.fold_in(keys[s], 1)
        init = train.one_seed(init_fn(keys[s : s + 1]).params)
        out["init"].append(statistics(cfg, setup, trace, init, replay_key, episodes))
        if trained is not None:
            params = train.one_seed(trained, s)
            out["trained"].append(statistics(cfg, setup, trace, params, replay_key, episodes))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m experiments.studies.memory_inputs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite-results", default="results/paper_agent")
    p.add_argument("--runs", default="runs/grid/paper_agent", help="the cells' scratch runs")
    p.add_argument("--episodes", type=int, default=16, help="episodes per seed")
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the cells")
    p.add_argument("--init-only", action="store_true", help="skip the trained params")
    p.add_argument(
        "--out",
        default="results/paper_agent/memory_inputs.json",
        help="json of every cell's statistics; updated cell by cell (other cells' rows stay)",
    )
    args = p.parse_args(argv)
    rows = report.read_json(args.out)  # what --out holds already stays, unless recomputed here
    cols = [f"{n} {w}" for n in ("const_x", "obs_share", "time_share", "key_cos") for w in WHEN]
    print("| cell | final ×100 | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for cell in report.collect(args.suite_results, log=lambda _: None):
        if args.variants and cell.variant not in args.variants:
            continue
        stats = cell_statistics(
            os.path.join(args.suite_results, cell.env, cell.variant),
            os.path.join(args.runs, cell.env, cell.variant),
            args.episodes,
            with_trained=not args.init_only,
        )
        rows[f"{cell.env}/{cell.variant}"] = dict(final=list(map(float, cell.final)), **stats)
        report.write_atomic(args.out, json.dumps(rows, indent=2) + "\n")

        def fmt(when, name, stats=stats):
            v = [r[name] for r in stats[when]]
            return f"{np.mean(v):.2f} ± {np.std(v):.2f}" if v else "—"

        values = [
            fmt(w, n) for n in ("const_x", "obs_share", "time_share", "key_cos") for w in WHEN
        ]
        print(f"| {cell.variant} | {report.fmt_x100(cell.final)} | " + " | ".join(values) + " |")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
