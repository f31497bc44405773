"""experiments.studies.collapse: the fall detector on hand-made curves, and one tiny run through
train -> diagnose -> summarize."""

import dataclasses
import json

import numpy as np

import run
from config import Config
from experiments.studies import collapse


def fake_run(tmp_path, returns):
    """A run dir whose metrics.csv holds `returns` [U, S] (and a flat entropy)."""
    U, S = returns.shape
    cfg = Config(out=str(tmp_path), num_seeds=S, num_envs=4, num_steps=8, num_minibatches=1)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    metrics = {"episode_return": returns, "entropy": np.full((U, S), 0.5)}
    run.append_csv(cfg, 0, metrics, np.zeros(U))
    return cfg


def test_falls_finds_the_seed_that_fell_and_when(tmp_path):
    U = 200
    t = np.arange(U)
    hold = np.minimum(1.0, t / 50)  # learns by update 50, stays
    fall = np.where(t < 120, hold, 1.0 - 0.3 * (t - 120) / 80)  # from 1 at 120 to 0.7 at the end
    cfg = fake_run(tmp_path, np.stack([hold, fall], 1))
    rows = collapse.falls(str(tmp_path))
    assert [r["fell"] for r in rows] == [False, True]
    assert abs(rows[1]["fall"] - 0.3) < 0.03 and abs(rows[1]["final"] - 0.7) < 0.03
    assert 50 * cfg.steps_per_update <= rows[1]["best_at_steps"] <= 130 * cfg.steps_per_update
    assert rows[0]["fall"] < 1e-9


def test_tiny_run_trains_diagnoses_and_summarizes(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--snapshots", "2", "--out", str(out), "--env", "RepeatPreviousEasy"]
    argv += ["--total-timesteps", "2048", "--num-envs", "4", "--num-steps", "64"]
    argv += ["--num-minibatches", "1", "--num-epochs", "1", "--num-seeds", "2", "--no-progress"]
    collapse.main(argv)
    assert sorted(p.name for p in (out / "params").iterdir()) == ["4.msgpack", "8.msgpack"]
    collapse.main(["diagnose", str(out), "--episodes", "2"])
    rows = (out / "diagnosis.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # header + 2 snapshots x 2 seeds
    header = rows[0].split(",")
    for name in ("return_greedy", "return_theta0", "theta_flip", "max_abs_m", "log_prod_c"):
        assert name in header
    values = np.array([[float(v) for v in r.split(",")] for r in rows[1:]])
    assert np.isfinite(values).all()
    assert (values[:, header.index("theta_sign_agreement")] > 0.5).all()  # xavier_abs: alike
    collapse.main(["summarize", str(out), "--out", str(tmp_path / "falls.csv")])
    assert len((tmp_path / "falls.csv").read_text().splitlines()) == 3
