"""Does the product of SHM's calibration matrices stay bounded? (the paper's Fig. 3a)

In M_t = C_t ⊙ M_{t-1} + U_t, what was written at step s reaches step t scaled, entry by entry,
by the product of the calibrations in between. The cumulative product P_t = ∏_{s≤t} C_s over a
long stretch of acting says whether a design can keep old content (P_t stays near 1), forgets it
(P_t → 0: vanishing gradients) or blows it up (P_t → ∞: exploding memory and gradients); Prop.
4-5 of Le et al. (2025) argue that SHM's random-θ calibration keeps it bounded, and Prop. 3 that a
fixed, input-independent one (`shm_fixed`) cannot.

    python -m experiments.calibration cumprod runs/grid/calibration/RepeatPreviousEasy/* \\
        --episodes 100 --out results/calibration/cumprod

reloads each trained run (a run directory with config.json and params.msgpack, `run.load_run`),
replays `--episodes` consecutive episodes of one env with each seed's policy
(`train.replay_episode`), takes the calibration C_t the SHM layer used at every step
(`train.make_memory_trace`), and forms P_t over all those steps, IGNORING the episode resets (the
product the layer would apply if it never reset). It works in log space, ln|P_t| = Σ_{s≤t}
ln|C_s| in float64 (an entry C_s = 0 gives -inf from then on), so nothing overflows. It writes
`<out>/<env>/<name>.csv`, name the run directory's own name (in a suite, the variant: shm,
shm_fixed, shm_abs, ...), with columns t, seed, log10_norm (log10 of P_t's Frobenius norm),
log10_max and log10_min (log10 of the largest and smallest |P_t| entry), every `--every`-th step
and always the last. `shm_nocal` has C ≡ 1, so P_t ≡ 1 and log10_norm = log10 H: the bounded
reference line. Memories without an SHM layer (gru, lru) are refused.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import jax
import numpy as np

import run
import train

COLUMNS = ("t", "seed", "log10_norm", "log10_max", "log10_min")
CHUNK = 1024  # steps per compiled trace call (the last chunk is padded to it)


def log_cumprod(C: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """ln|P_t| for the elementwise cumulative product P_t = P_start ∏_{s≤t} C_s over axis 0.

    C: [T, ...]; start: ln|P| before C_0, [...] (0 by default; chains the chunks of a long
    sequence). Returns float64 [T, ...]; -inf where some C_s = 0 (s ≤ t)."""
    with np.errstate(divide="ignore"):
        log_abs = np.log(np.abs(np.asarray(C, np.float64)))
    out = np.cumsum(log_abs, axis=0)
    return out if start is None else out + start


def cumprod_stats(log_P: np.ndarray) -> dict[str, np.ndarray]:
    """Per step t, from ln|P_t| [T, H, H]: log10 of P_t's Frobenius norm, of its largest and of
    its smallest |entry|, each [T] (-inf where they are 0). The norm is a log-sum-exp, so it is
    exact even where P_t itself would overflow float64."""
    L = log_P.reshape(log_P.shape[0], -1)
    top = L.max(axis=1)
    shift = np.where(np.isfinite(top), top, 0.0)[:, None]  # all entries -inf: norm -inf
    with np.errstate(divide="ignore"):
        log_norm = shift[:, 0] + 0.5 * np.log(np.exp(2.0 * (L - shift)).sum(axis=1))
    ln10 = math.log(10.0)
    return {"log10_norm": log_norm / ln10, "log10_max": top / ln10, "log10_min": L.min(1) / ln10}


def keep_steps(T: int, every: int) -> np.ndarray:
    """Indices of the steps written: every `every`-th step and always the last."""
    return np.unique(np.r_[np.arange(0, T, every), T - 1])


def chunk(x: np.ndarray, start: int) -> np.ndarray:
    """Steps start .. start + CHUNK of a replay's [T, ...] array as [CHUNK, 1, ...], zero-padded
    past its end (padding comes after the real steps, so it changes none of them)."""
    part = x[start : start + CHUNK]
    return np.concatenate([part, np.zeros((CHUNK - len(part), *x.shape[1:]), x.dtype)])[:, None]


def cumprod_run(
    directory: str, episodes: int = 100, every: int = 10, seed: int = 0, log=print
) -> dict[str, np.ndarray]:
    """The cumulative-product statistics of one trained run, all its seeds: {column: [rows]}
    with the columns of `COLUMNS` (rows ordered by seed, then t). `seed` seeds the replays."""
    if episodes < 1 or every < 1:
        raise ValueError(f"--episodes ({episodes}) and --every ({every}) must be >= 1")
    cfg, params = run.load_run(directory)
    setup = train.make_env_and_network(cfg)
    trace = train.make_memory_trace(setup)  # ValueError for memories without an SHM layer
    out = {c: [] for c in COLUMNS}
    for s in range(cfg.num_seeds):
        p = train.one_seed(params, s)
        ep = train.replay_episode(cfg, setup, p, jax.random.key(seed + s), num_episodes=episodes)
        T = len(ep["reset"])
        carry, log_P, rows = setup.network.initialize_carry((1,)), None, []
        for a in range(0, T, CHUNK):  # chunks carrying the network's carry: one compile
            carry, tr = trace(p, carry, *(chunk(ep[k], a) for k in ("obs", "reset", "aux")))
            L = log_cumprod(np.asarray(tr["C"][: T - a, 0]), log_P)  # [n, H, H], pad cut
            log_P = L[-1]
            rows.append(cumprod_stats(L))
        stats = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        keep = keep_steps(T, every)
        out["t"].append(keep)
        out["seed"].append(np.full(len(keep), s))
        for k, v in stats.items():
            out[k].append(v[keep])
        log(
            f"{directory}: {cfg.env} | {cfg.memory} | seed {s}: {ep['done'].sum()} episodes, "
            f"{T} steps; at the last step log10 ‖P‖ = {stats['log10_norm'][-1]:.2f}, "
            f"entries in 10^[{stats['log10_min'][-1]:.2f}, {stats['log10_max'][-1]:.2f}]"
        )
    return {k: np.concatenate(v) for k, v in out.items()}


def write_csv(columns: dict[str, np.ndarray], path: str) -> None:
    """One row per (seed, t); floats with 6 significant digits (-inf as "-inf")."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i in range(len(columns["t"])):
            row = [int(columns["t"][i]), int(columns["seed"][i])]
            writer.writerow(row + [f"{float(columns[c][i]):.6g}" for c in COLUMNS[2:]])


def load_cumprod(directory: str) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Every `<directory>/<env>/<name>.csv` that `cumprod` wrote: {(env, name): {column:
    array}}; {} if the directory does not exist."""
    found = {}
    if not os.path.isdir(directory):
        return found
    for env in sorted(os.listdir(directory)):
        env_dir = os.path.join(directory, env)
        if not os.path.isdir(env_dir):
            continue
        for name in sorted(os.listdir(env_dir)):
            if name.endswith(".csv"):
                with open(os.path.join(env_dir, name), newline="") as f:
                    rows = list(csv.DictReader(f))
                found[(env, name[: -len(".csv")])] = {
                    c: np.array([float(r[c]) for r in rows]) for c in COLUMNS
                }
    return found


def plot_cumprod(ax, columns: dict[str, np.ndarray], label: str | None = None, color=None):
    """On a matplotlib axis, per seed: log10 ‖P_t‖ against t (a line) and the range of P_t's
    entries, log10 of the smallest to the largest |entry| (a band). Entries that reached 0
    (-inf) are left out of the band."""
    finite = lambda x: np.where(np.isfinite(x), x, np.nan)
    for i, s in enumerate(np.unique(columns["seed"])):
        rows = columns["seed"] == s
        t = columns["t"][rows]
        line = ax.plot(t, columns["log10_norm"][rows], color=color, lw=1.2)[0]
        if i == 0 and label is not None:
            line.set_label(label)
        color = line.get_color()
        lo, hi = finite(columns["log10_min"][rows]), finite(columns["log10_max"][rows])
        ax.fill_between(t, lo, hi, color=color, alpha=0.12, lw=0)


def cmd_cumprod(args) -> None:
    configs = [run.load_config(directory, flag="cumprod") for directory in args.runs]
    for cfg in configs:  # refuse memories without an SHM layer before any work
        train.make_memory_trace(train.make_env_and_network(cfg))
    paths = [
        os.path.join(args.out, cfg.env, os.path.basename(os.path.normpath(d)) + ".csv")
        for d, cfg in zip(args.runs, configs, strict=True)
    ]
    if len(set(paths)) < len(paths):
        raise ValueError(
            "two run directories with the same name and env would write the same csv: "
            "give each run its own directory name"
        )
    for directory, path in zip(args.runs, paths, strict=True):
        columns = cumprod_run(directory, args.episodes, args.every, args.seed)
        write_csv(columns, path)
        print(f"-> {path}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.calibration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cumprod", help="log-cumulative product of C_t over trained replays")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (params.msgpack)")
    c.add_argument("--episodes", type=int, default=100, help="consecutive episodes per seed")
    c.add_argument("--every", type=int, default=10, help="write every N-th step (and the last)")
    c.add_argument("--seed", type=int, default=0, help="seed of the replays")
    c.add_argument("--out", default="results/calibration/cumprod", help="output directory")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        cmd_cumprod(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
