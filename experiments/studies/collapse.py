"""Does SHM un-learn what it learned? Train many seeds with the params kept along the way, then
measure, at every kept point and for every seed, what might explain a late fall of the return.

    python -m experiments.studies.collapse train --out runs/collapse/shm [train.py flags ...]
    python -m experiments.studies.collapse diagnose runs/collapse/shm [--episodes 32]
        [--out results/collapse/shm_diagnosis.csv]
    python -m experiments.studies.collapse summarize RUN_DIR ... [--out results/collapse/falls.csv]
    python -m experiments.studies.collapse plot SHM_RUN GRU_RUN DIAGNOSIS_CSV --out results/collapse

`train` runs `train.make_train` segment by segment (the same program `python train.py` runs, so
the same seed gives the same metrics.csv) and writes DIR/config.json, DIR/metrics.csv and the
params of every seed at each of `--snapshots` evenly spaced points (DIR/params/<update>.msgpack).

`diagnose` replays each snapshot and seed on `--episodes` fresh episodes and writes one csv row
per (update, seed):
- return_sampled, return_greedy: mean episode return acting as in training (sampled actions and
  θ rows), and with the most likely action (θ rows still drawn);
- return_theta0: greedy actions and a fixed θ row (row 0 every step): what is left when the
  memory's per-step randomness is removed;
- theta_flip: over the episodes' steps, the mean total-variation distance between the policy's
  action distribution under the drawn θ rows and under fresh θ rows for the same observations:
  how much of the policy's randomness the memory's θ draw contributes;
- entropy: the policy's mean entropy on those steps;
- theta_norm, theta_sign_agreement: Θ's Frobenius norm, and the mean over columns of the
  fraction of rows whose sign agrees with the column's majority (1 = every row alike);
- max_abs_m: the largest |M_t| entry along the episodes;
- log_prod_c: the largest |Σ_t log C_t[i, j]| over an episode (the product of C over it, in
  log space: how far the calibration alone can grow or shrink a memory entry).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

import run
import train
from inspection import make_memory_trace, one_seed


def train_with_snapshots(cfg: train.Config, snapshots: int) -> None:
    """Train per `cfg`, writing metrics.csv and `snapshots` params files to cfg.out."""
    os.makedirs(os.path.join(cfg.out, "params"), exist_ok=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    program = train.make_train(cfg)
    runner = jax.jit(program.init)(train.make_keys(cfg))
    U = program.num_updates
    K = max(1, math.ceil(U / snapshots))
    segment = jax.jit(lambda r: program.updates(r, K, stop=U))
    done = 0
    while done < U:
        runner, metrics = segment(runner)
        n = min(K, U - done)
        metrics = {k: np.asarray(v)[:n] for k, v in metrics.items()}
        run.append_csv(cfg, done, metrics, np.zeros(n))
        done += n
        path = os.path.join(cfg.out, "params", f"{done}.msgpack")
        with open(path, "wb") as f:
            f.write(serialization.to_bytes(jax.device_get(runner.params)))
        print(f"{done}/{U} updates, return {np.nanmean(metrics['episode_return'][-1]):.3f}")


def policy_probs(setup, params, obs, reset, aux):
    """The policy's action probabilities [T, A] along a replay (obs [T, d], reset [T]), with θ
    rows `aux` [T]."""
    carry = setup.network.initialize_carry((1,))
    _, logits, _ = setup.network.apply(params, carry, obs[:, None], reset[:, None], aux[:, None])
    return jax.nn.softmax(logits[:, 0], -1)


def diagnose_one(cfg, setups, trace, probs_fn, params, key, episodes: int) -> dict[str, float]:
    """The measures listed in the module docstring for one seed's params. `setups`: the run's
    Setup and the same network with a fixed θ row (shm_single)."""
    setup, setup0 = setups
    k_samp, k_greedy, k_theta0, k_flip = jax.random.split(key, 4)
    sampled = train.replay_episode(cfg, setup, params, k_samp, episodes)
    greedy = train.replay_episode(cfg, setup, params, k_greedy, episodes, greedy=True)
    out = dict(
        return_sampled=float(sampled["episode_return"].mean()),
        return_greedy=float(greedy["episode_return"].mean()),
    )
    single = dataclasses.replace(cfg, memory="shm_single")
    theta0 = train.replay_episode(single, setup0, params, k_theta0, episodes, greedy=True)
    out["return_theta0"] = float(theta0["episode_return"].mean())
    obs, reset = jnp.asarray(sampled["obs"]), jnp.asarray(sampled["reset"])
    probs = probs_fn(params, obs, reset, jnp.asarray(sampled["aux"]))
    fresh = setup.memory.sample_aux(k_flip, sampled["aux"].shape)
    probs_fresh = probs_fn(params, obs, reset, fresh)
    out["theta_flip"] = float(0.5 * jnp.abs(probs - probs_fresh).sum(-1).mean())
    out["entropy"] = float(-(probs * jnp.log(probs + 1e-12)).sum(-1).mean())
    theta = np.asarray(params["params"]["memory"]["theta"])
    majority = np.sign(theta.sum(0))
    out["theta_norm"] = float(np.linalg.norm(theta))
    out["theta_sign_agreement"] = float((np.sign(theta) == majority).mean())
    carry = setup.network.initialize_carry((1,))
    inputs = (jnp.asarray(sampled[k])[:, None] for k in ("obs", "reset", "aux"))
    _, mem = trace(params, carry, *inputs)
    M, C = np.asarray(mem["M"][:, 0]), np.asarray(mem["C"][:, 0])
    out["max_abs_m"] = float(np.abs(M).max())
    log_c = np.log(np.abs(C))
    ep = sampled["episode"]
    out["log_prod_c"] = float(max(np.abs(log_c[ep == e].sum(0)).max() for e in np.unique(ep)))
    return out


def diagnose(directory: str, episodes: int, out_path: str) -> None:
    """Write the diagnosis csv of the run in `directory` (see the module docstring)."""
    cfg = run.load_config(directory, flag="diagnose")
    if not cfg.memory.startswith("shm"):
        raise ValueError(f"diagnose reads an SHM layer; {directory} trained {cfg.memory}")
    setup = train.make_env_and_network(cfg)
    setups = (setup, train.make_env_and_network(dataclasses.replace(cfg, memory="shm_single")))
    trace = make_memory_trace(setup)
    probs_fn = jax.jit(lambda *a: policy_probs(setup, *a))
    files = sorted((int(f.split(".")[0]), f) for f in os.listdir(os.path.join(directory, "params")))
    rows = []
    template = None
    for update, name in files:
        with open(os.path.join(directory, "params", name), "rb") as f:
            data = f.read()
        if template is None:
            template = serialization.msgpack_restore(data)
        params_all = serialization.from_bytes(template, data)
        for seed in range(cfg.num_seeds):
            params = one_seed(params_all, seed)
            key = jax.random.fold_in(jax.random.key(cfg.seed + 7), update * 1000 + seed)
            row = dict(update=update, env_steps=update * cfg.steps_per_update, seed=seed)
            row.update(diagnose_one(cfg, setups, trace, probs_fn, params, key, episodes))
            rows.append(row)
            print(", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


WINDOW = 0.05  # a tenth of a tenth: the share of a run's updates one window of the curve spans
FALL = 0.05  # a seed "falls" when its final window is this far below its best window


def falls(directory: str) -> list[dict]:
    """Per seed of the run in `directory`: its best window (mean return over WINDOW of the
    updates) and where it ended, its final window, the fall between them, and whether it fell
    by more than FALL. Also the entropy at the best and final windows."""
    cfg = run.load_config(directory, flag="summarize")
    m = run.read_csv(cfg)
    ret, ent = m["episode_return"], m["entropy"]  # [U, S]
    U = ret.shape[0]
    w = max(1, round(WINDOW * U))
    kernel = np.ones(w) / w
    rows = []
    for s in range(cfg.num_seeds):
        smooth = np.convolve(ret[:, s], kernel, mode="valid")  # window ending at update i + w
        best = int(np.argmax(smooth))
        final = float(smooth[-1])
        rows.append(
            dict(
                run=os.path.basename(os.path.normpath(directory)),
                memory=cfg.memory,
                seed=s,
                best=float(smooth[best]),
                best_at_steps=(best + w) * cfg.steps_per_update,
                final=final,
                fall=float(smooth[best] - final),
                fell=bool(smooth[best] - final > FALL),
                entropy_at_best=float(ent[best : best + w, s].mean()),
                entropy_final=float(ent[-w:, s].mean()),
            )
        )
    return rows


def summarize(directories: list[str], out_path: str | None) -> None:
    """Print (and with `out_path`, write as csv) `falls` for every run, then one line per run:
    how many seeds fell, the mean ± std final return, the worst seed."""
    rows = [r for d in directories for r in falls(d)]
    for r in rows:
        print(
            ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
        )
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == name]
        final = np.array([r["final"] for r in mine])
        print(
            f"{name}: {sum(r['fell'] for r in mine)}/{len(mine)} fell; final "
            f"{final.mean():.3f} ± {final.std():.3f}, worst {final.min():.3f}"
        )
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def plot(shm_dir: str, gru_dir: str, diagnosis_csv: str, out_dir: str) -> None:
    """Two figures in out_dir: curves.png (return per seed over training, SHM beside GRU, the
    seeds that fell drawn in red) and diagnosis.png (each diagnosis measure over training, per
    SHM seed, the seeds that fell in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    fell = {}
    for ax, directory in zip(axes, (shm_dir, gru_dir), strict=True):
        cfg = run.load_config(directory, flag="plot")
        m = run.read_csv(cfg)
        rows = falls(directory)
        fell[cfg.memory] = {r["seed"] for r in rows if r["fell"]}
        steps = m["env_steps"][:, 0] / 1e6
        w = max(1, round(WINDOW * len(steps)))
        for s_ in range(cfg.num_seeds):
            smooth = np.convolve(m["episode_return"][:, s_], np.ones(w) / w, mode="valid")
            red = s_ in fell[cfg.memory]
            ax.plot(steps[w - 1 :], smooth, color="tab:red" if red else "tab:blue", lw=1)
        n = len(fell[cfg.memory])
        ax.set_title(f"{cfg.memory}: {n}/{cfg.num_seeds} seeds fell (red)")
        ax.set_xlabel("env steps (M)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("episode return (window mean)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=110)
    plt.close(fig)

    with open(diagnosis_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    measures = [k for k in rows[0] if k not in ("update", "env_steps", "seed")]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(measures) / cols), cols, figsize=(14, 7))
    seeds = sorted({int(r["seed"]) for r in rows})
    for ax, name in zip(axes.flat, measures, strict=False):
        for s_ in seeds:
            mine = [r for r in rows if int(r["seed"]) == s_]
            x = [float(r["env_steps"]) / 1e6 for r in mine]
            red = s_ in fell.get("shm", set())
            ax.plot(x, [float(r[name]) for r in mine], color="tab:red" if red else "tab:blue")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(measures) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "diagnosis.png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        p = argparse.ArgumentParser(prog="python -m experiments.studies.collapse train")
        p.add_argument("--snapshots", type=int, default=30)
        args, rest = p.parse_known_args(argv[1:])
        cfg = run.parse_config(rest)
        train.make_env_and_network(cfg)  # bad input fails here, before compiling
        train_with_snapshots(cfg, args.snapshots)
        return
    if argv and argv[0] == "summarize":
        p = argparse.ArgumentParser(prog="python -m experiments.studies.collapse summarize")
        p.add_argument("run_dirs", nargs="+")
        p.add_argument("--out", default=None)
        args = p.parse_args(argv[1:])
        summarize(args.run_dirs, args.out)
        return
    if argv and argv[0] == "plot":
        p = argparse.ArgumentParser(prog="python -m experiments.studies.collapse plot")
        p.add_argument("shm_run")
        p.add_argument("gru_run")
        p.add_argument("diagnosis_csv")
        p.add_argument("--out", required=True)
        args = p.parse_args(argv[1:])
        plot(args.shm_run, args.gru_run, args.diagnosis_csv, args.out)
        return
    p = argparse.ArgumentParser(prog="python -m experiments.studies.collapse diagnose")
    p.add_argument("mode", choices=["diagnose"])
    p.add_argument("run_dir")
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    diagnose(args.run_dir, args.episodes, args.out or os.path.join(args.run_dir, "diagnosis.csv"))


if __name__ == "__main__":
    main()
