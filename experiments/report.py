"""Tables and learning curves from an experiment directory laid out as
`<root>/<env>/<variant>/{config.json, metrics.csv}` (what `experiments.popgym run` writes, or
any runs copied there by hand, e.g. an ablation):

    python -m experiments.report results/ablation                   # report.md + curves.png
    python -m experiments.report results/ablation --budget 500000   # "final" at 500k steps

Two numbers per cell, both ×100 and mean ± std (population std, ddof 0) over seeds:
- final: per seed, the mean episodic return over the last 10% of updates (as train.py's summary);
- MMER: POPGym's max mean episodic return: per seed, the max over updates of the update's mean
  episodic return.
Updates in which no episode finished have an empty `episode_return`; it is forward-filled per
seed first, as train.py's summary does. `--budget X` keeps only the updates with env_steps <= X,
which equals a run of budget X as long as nothing in the run depends on its length (constant
learning rate, no annealing).

Reads only csv/json (no jax), so a report is quick to rebuild.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import warnings

import numpy as np

METRIC = "episode_return"
# Config fields never listed as "differences": the table has its own columns for them, or they
# only say where and how a run was written and logged (a resumed run is bit-identical).
NOT_A_DIFFERENCE = {"env", "memory", "num_seeds", "total_timesteps", "out", "progress"}
NOT_A_DIFFERENCE |= {"overwrite", "checkpoint_every", "wandb", "wandb_project", "wandb_name"}


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Curves:
    """A run's learning curves: env_steps [U] (per seed, after each update) and returns [U, S]
    (the update's mean episodic return per seed, forward-filled; NaN before a seed's first
    finished episode)."""

    env_steps: np.ndarray
    returns: np.ndarray

    @property
    def num_seeds(self) -> int:
        return self.returns.shape[1]


def ffill(x: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs along axis 0 of x [U, S] (updates in which no episode finished)."""
    x = np.array(x, dtype=np.float64)
    for u in range(1, len(x)):
        x[u] = np.where(np.isnan(x[u]), x[u - 1], x[u])
    return x


def load_curves(path: str, metric: str = METRIC) -> Curves:
    """Read train.py's metrics.csv (one row per update per seed) into forward-filled Curves."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    if metric not in rows[0]:
        raise ValueError(f"{path}: no column {metric!r}; columns: {', '.join(rows[0])}")
    updates = sorted({int(r["update"]) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})
    u_index = {u: i for i, u in enumerate(updates)}
    s_index = {s: i for i, s in enumerate(seeds)}
    env_steps = np.zeros(len(updates), np.int64)
    returns = np.full((len(updates), len(seeds)), np.nan)
    for r in rows:
        u, s = u_index[int(r["update"])], s_index[int(r["seed"])]
        env_steps[u] = int(float(r["env_steps"]))
        if r[metric] not in ("", "nan", "NaN"):
            returns[u, s] = float(r[metric])
    return Curves(env_steps, ffill(returns))


def truncate(curves: Curves, max_env_steps: int) -> Curves:
    """The curves of the first updates only, those with env_steps <= max_env_steps: a longer
    run's prefix, equal to a shorter run when nothing depends on the run's length."""
    keep = curves.env_steps <= max_env_steps
    if not keep.any():
        raise ValueError(
            f"budget {max_env_steps:,} is below the first update ({curves.env_steps[0]:,} steps)"
        )
    return Curves(curves.env_steps[keep], curves.returns[keep])


def final_per_seed(curves: Curves) -> np.ndarray:
    """[S]: per seed, the mean return over the last 10% of updates (at least one)."""
    tail = curves.returns[-max(1, len(curves.env_steps) // 10) :]
    with warnings.catch_warnings():  # a seed that never finished an episode: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(tail, axis=0)


def mmer_per_seed(curves: Curves) -> np.ndarray:
    """[S]: per seed, POPGym's max mean episodic return, the max over updates of the return."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(curves.returns, axis=0)


def mean_std(per_seed) -> tuple[float, float]:
    """Mean and population std (ddof 0) over seeds."""
    x = np.asarray(per_seed, dtype=np.float64)
    return float(np.mean(x)), float(np.std(x))


def fmt_x100(per_seed) -> str:
    """'mean ± std' of per-seed values ×100, one decimal (the paper's Table 1 style)."""
    if per_seed is None or len(per_seed) == 0:
        return "—"
    mean, std = mean_std(per_seed)
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def fmt_steps(n: int) -> str:
    """Env steps, compact: 14.94M, 500k, 128."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    return f"{n:,}"


# ---------------------------------------------------------------------------------------------
# Cells of an experiment directory
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CellResult:
    """One (env, variant) directory: its config, curves and per-seed statistics."""

    env: str
    variant: str
    path: str
    config: dict
    curves: Curves
    finished: bool  # summary.json present (written by experiments.grid when a cell completes)

    @property
    def memory(self) -> str:
        return str(self.config.get("memory", self.variant))

    @property
    def preset(self) -> str:
        return str(self.config.get("preset", "?"))

    @property
    def env_steps(self) -> int:
        """Env steps per seed of the (possibly truncated) run."""
        return int(self.curves.env_steps[-1])

    @property
    def num_seeds(self) -> int:
        return self.curves.num_seeds

    @property
    def final(self) -> np.ndarray:
        return final_per_seed(self.curves)

    @property
    def mmer(self) -> np.ndarray:
        return mmer_per_seed(self.curves)


def read_json(path: str) -> dict:
    """A json file as a dict ({} if absent)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_cell(
    path: str, env: str, variant: str, budget: int | None = None, metric: str = METRIC
) -> CellResult:
    """Read one cell directory (metrics.csv required; config.json and summary.json optional)."""
    curves = load_curves(os.path.join(path, "metrics.csv"), metric)
    if budget is not None:
        curves = truncate(curves, budget)
    return CellResult(
        env=env,
        variant=variant,
        path=path,
        config=read_json(os.path.join(path, "config.json")),
        curves=curves,
        finished=os.path.exists(os.path.join(path, "summary.json")),
    )


def collect(
    root: str, budget: int | None = None, metric: str = METRIC, log=print
) -> list[CellResult]:
    """Every `<root>/<env>/<variant>/metrics.csv`, sorted by env then variant. Cells whose run
    is shorter than one update of `budget` are left out with a note."""
    if not os.path.isdir(root):
        raise ValueError(f"no experiment directory {root!r}")
    cells = []
    for env in sorted(os.listdir(root)):
        env_dir = os.path.join(root, env)
        if not os.path.isdir(env_dir):
            continue
        for variant in sorted(os.listdir(env_dir)):
            path = os.path.join(env_dir, variant)
            if not os.path.isfile(os.path.join(path, "metrics.csv")):
                continue
            try:
                cells.append(load_cell(path, env, variant, budget, metric))
            except ValueError as err:
                log(f"note: skipping {path}: {err}")
    return cells


def find_cells(
    root: str, envs, variants, metric: str = METRIC
) -> tuple[dict[tuple[str, str], CellResult], list[str]]:
    """The cells `<root>/<env>/<variant>` of a grid that can be read with `metric`, keyed by
    (env, variant), and one line for each that cannot (not run yet, or no such column): a
    notebook plots what is there and says what is not."""
    found, missing = {}, []
    for env in envs:
        for variant in variants:
            path = os.path.join(root, env, variant)
            if not os.path.isfile(os.path.join(path, "metrics.csv")):
                missing.append(f"{env}/{variant}: no metrics.csv in {path}")
                continue
            try:
                found[env, variant] = load_cell(path, env, variant, metric=metric)
            except ValueError as err:
                missing.append(f"{env}/{variant}: {err}")
    return found, missing


def random_level(cell: CellResult, metric: str = METRIC) -> float | None:
    """The uniformly random policy's `metric` as the cell's run measured it at its end
    (summary.json's train_summary; for meta-RL's eval_* metrics that is on the held-out tasks,
    as the baseline is), or None where the summary does not have it."""
    summary = read_json(os.path.join(cell.path, "summary.json")).get("train_summary") or {}
    name = {"eval_return": "episode_return"}.get(metric, metric.removeprefix("eval_"))
    value = (summary.get("random_metrics") or {}).get(name)
    if value is None and name == "episode_return":
        value = summary.get("random_return")
    return value


def _applies(key: str, config: dict) -> bool:
    """Whether a config field does anything in this run (theta_init and memory_method only for
    SHM memories, calib_init only for θ-calibrated ones, memory_unroll only for the GRU)."""
    memory = str(config.get("memory", "shm"))
    if key in ("theta_init", "memory_method"):
        return memory.startswith("shm")
    if key == "calib_init":
        return memory in ("shm", "shm_single")
    return key != "memory_unroll" or memory == "gru"


def config_differences(cells: list[CellResult]) -> list[str]:
    """Per cell, 'key=value, ...' of the config fields that are not the same in every cell
    (among the cells where the field does anything)."""
    keys = sorted({k for c in cells for k in c.config} - NOT_A_DIFFERENCE)
    used = {
        k: [i for i, c in enumerate(cells) if k in c.config and _applies(k, c.config)] for k in keys
    }
    varying = [k for k in keys if len({json.dumps(cells[i].config[k]) for i in used[k]}) > 1]
    return [
        ", ".join(f"{k}={c.config[k]}" for k in varying if i in used[k]) or "—"
        for i, c in enumerate(cells)
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cells_table(cells: list[CellResult]) -> str:
    """One row per (env, variant): memory, config differences, budget, final and MMER."""
    header = ["Env", "Variant", "Memory", "Differences", "Steps/seed", "Seeds"]
    header += ["Final ×100", "MMER ×100"]
    rows = [
        [
            c.env,
            c.variant,
            c.memory,
            diff,
            fmt_steps(c.env_steps),
            str(c.num_seeds),
            fmt_x100(c.final),
            fmt_x100(c.mmer),
        ]
        for c, diff in zip(cells, config_differences(cells), strict=True)
    ]
    return markdown_table(header, rows)


DEFINITIONS = (
    "Final: per seed, the mean episodic return over the last 10% of updates; MMER (POPGym's max "
    "mean episodic return): per seed, the max over updates of the update's mean episodic return. "
    "Both ×100, mean ± std (ddof 0) over seeds; updates without a finished episode carry the "
    "previous value forward."
)


# ---------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------


def plot_band(ax, curves: Curves, label: str | None = None, color=None) -> None:
    """Mean ± std over seeds of `curves` against env steps per seed, on a matplotlib axis."""
    with warnings.catch_warnings():  # all-NaN updates before the first episode ends
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(curves.returns, axis=1)
        std = np.nanstd(curves.returns, axis=1)
    x = curves.env_steps
    line = ax.plot(x, mean, color=color, label=label)[0]
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def plot_curves(
    cells: list[CellResult],
    path: str,
    env_order: list[str] | None = None,
    ylabel: str = METRIC,
) -> None:
    """Fig. 4 style: one panel per env, one line per variant, mean ± std band over seeds
    against env steps per seed; saved to path (png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(c.env for c in cells))
    if env_order is not None:
        envs.sort(key=lambda e: (env_order.index(e) if e in env_order else len(env_order), e))
    variants = list(dict.fromkeys(c.variant for c in cells))
    # Past 10 variants: 20 colours, and one legend beside the panels instead of one in each.
    many = len(variants) > 10
    palette = plt.get_cmap("tab20") if many else None
    colors = {v: palette(i % 20) if many else f"C{i % 10}" for i, v in enumerate(variants)}
    ncols = min(4, max(1, len(envs)))
    nrows = max(1, math.ceil(len(envs) / ncols))
    width = 4 * ncols + (4 if many else 0)
    height = 3 * nrows + (0.15 * len(variants) if many else 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    for ax, env in zip(axes.flat, envs, strict=False):
        for c in cells:
            if c.env != env:
                continue
            plot_band(ax, c.curves, f"{c.variant} ({c.num_seeds})", colors[c.variant])
        ax.set_title(env, fontsize=10)
        ax.set_xlabel("env steps (per seed)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not many:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(envs) :]:
        ax.axis("off")
    if many:
        legend = {}
        for ax in axes.flat:
            legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
        fig.legend(legend.values(), legend.keys(), fontsize=7, loc="center right")
        fig.tight_layout(rect=(0, 0, 1 - 4 / width, 1))
    else:
        fig.tight_layout()
    write_figure_atomic(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_atomic(path: str, data: str | bytes) -> None:
    """Write a file so that readers see the old or the new content, never a partial one
    (temp file in the same directory, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_figure_atomic(fig, path: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_report_args(parser: argparse.ArgumentParser, default_results: str | None) -> None:
    """The options every report command shares."""
    if default_results is None:
        parser.add_argument("results", help="experiment directory: <results>/<env>/<variant>/")
    else:
        parser.add_argument("--results", default=default_results, help="experiment directory")
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="use only the updates with env_steps <= BUDGET (final/MMER at an earlier budget)",
    )
    parser.add_argument("--metric", default=METRIC, help="metrics.csv column to report")
    parser.add_argument(
        "--out", default=None, help="markdown file (default <results>/report[-BUDGET].md)"
    )
    parser.add_argument(
        "--curves", default=None, help="png (default <results>/curves[-BUDGET].png)"
    )


def output_paths(args) -> tuple[str, str]:
    """report.md and curves.png in the results directory (report-BUDGET.md with --budget)."""
    suffix = f"-{args.budget}" if args.budget else ""
    return (
        args.out or os.path.join(args.results, f"report{suffix}.md"),
        args.curves or os.path.join(args.results, f"curves{suffix}.png"),
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m experiments.report DIR`: print the table, write report.md and curves.png."""
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__)
    add_report_args(parser, default_results=None)
    args = parser.parse_args(argv)
    try:
        cells = collect(args.results, args.budget, args.metric)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if not cells:
        print(f"error: no <env>/<variant>/metrics.csv under {args.results!r}", file=sys.stderr)
        sys.exit(2)
    table = cells_table(cells)
    budget = f" (budget cut at {args.budget:,} env steps per seed)" if args.budget else ""
    text = f"# {os.path.basename(os.path.normpath(args.results))}{budget}\n\n{table}\n\n"
    text += DEFINITIONS + "\n"
    out, curves = output_paths(args)
    write_atomic(out, text)
    plot_curves(cells, curves, ylabel=args.metric)
    print(table)
    print(f"-> {out}, {curves}")


if __name__ == "__main__":
    main()
