"""Tests of the experiments package: final / MMER against a hand computation on a small
metrics.csv (forward fill, last 10%, ×100, mean ± std over seeds, an earlier budget), the
paper's cells in the POPGym table, a grid that resumes (train.run replaced by a fake that writes
a small metrics.csv) and continues an interrupted cell, --jobs in processes, input errors, and one real tiny cell end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import envs
import train
from experiments import grid, popgym, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2", "--num-epochs", "1"]
TINY += ["--memory-size", "8", "--hidden", "16"]


def write_metrics(path, returns, steps_per_update=64):
    """A train.py-style metrics.csv from returns [U, S] (NaN = empty cell: no episode ended)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["update", "seed", "env_steps", "steps_per_s", "episode_return", "entropy"])
        for u, row in enumerate(np.asarray(returns), 1):
            for s, r in enumerate(row):
                w.writerow([u, s, u * steps_per_update, "100.0", "" if np.isnan(r) else r, 1.0])


# Two seeds x 20 updates. Hand computation (last 10% = updates 19 and 20):
# seed 0: u/20 up to u = 17, then 0.3, (empty -> 0.3), 1.0: final (0.3 + 1.0) / 2 = 0.65, MMER 1.0
# seed 1: 0.5 but u1 empty, u3 0.9, u19 0.2, u20 empty -> 0.2: final 0.2, MMER 0.9
# ×100 over seeds: final 42.5 ± 22.5, MMER 95.0 ± 5.0 (population std).
# Cut at 640 env steps (10 updates, last 10% = update 10): final 50.0 ± 0.0, MMER 70.0 ± 20.0.
SEED0 = [u / 20 for u in range(1, 18)] + [0.3, np.nan, 1.0]
SEED1 = [np.nan, 0.5, 0.9] + [0.5] * 15 + [0.2, np.nan]
RETURNS = np.array([SEED0, SEED1]).T  # [U, S]


def test_final_and_mmer_match_hand_computation(tmp_path):
    path = str(tmp_path / "metrics.csv")
    write_metrics(path, RETURNS)
    curves = report.load_curves(path)
    np.testing.assert_array_equal(curves.env_steps, 64 * np.arange(1, 21))
    np.testing.assert_allclose(report.final_per_seed(curves), [0.65, 0.2])
    np.testing.assert_allclose(report.mmer_per_seed(curves), [1.0, 0.9])
    assert report.fmt_x100(report.final_per_seed(curves)) == "42.5 ± 22.5"
    assert report.fmt_x100(report.mmer_per_seed(curves)) == "95.0 ± 5.0"

    short = report.truncate(curves, 640 + 63)  # a budget between updates keeps whole updates
    assert len(short.env_steps) == 10
    assert report.fmt_x100(report.final_per_seed(short)) == "50.0 ± 0.0"
    assert report.fmt_x100(report.mmer_per_seed(short)) == "70.0 ± 20.0"
    with pytest.raises(ValueError, match="below the first update"):
        report.truncate(curves, 63)


def test_find_cells_says_what_is_missing_and_random_level(tmp_path):
    """What the notebooks rely on: the cells that are there, a line for each that is not (no
    metrics.csv, or no such column), and the random policy's level from summary.json."""
    write_metrics(str(tmp_path / "Env" / "a" / "metrics.csv"), RETURNS)
    write_metrics(str(tmp_path / "Env" / "b" / "metrics.csv"), RETURNS)
    summary = {"train_summary": {"random_return": -0.5, "random_metrics": {"episode_success": 0.1}}}
    with open(tmp_path / "Env" / "a" / "summary.json", "w") as f:
        json.dump(summary, f)
    cells, missing = report.find_cells(str(tmp_path), ["Env"], ["a", "b", "c"])
    assert list(cells) == [("Env", "a"), ("Env", "b")] and cells["Env", "a"].num_seeds == 2
    assert len(missing) == 1 and missing[0].startswith("Env/c: no metrics.csv")
    _, missing = report.find_cells(str(tmp_path), ["Env"], ["a"], metric="episode_success")
    assert "no column 'episode_success'" in missing[0]
    assert report.random_level(cells["Env", "a"]) == -0.5
    assert report.random_level(cells["Env", "a"], "episode_success") == 0.1
    # meta-RL's held-out-task return: the random policy is evaluated on the held-out tasks
    assert report.random_level(cells["Env", "a"], "eval_return") == -0.5
    assert report.random_level(cells["Env", "a"], "entropy") is None
    assert report.random_level(cells["Env", "b"]) is None  # no summary.json


def test_generic_report_one_row_per_env_and_variant(tmp_path, capsys):
    root = tmp_path / "ablation"
    for variant, lr in (("base", 1e-3), ("low-lr", 1e-4)):
        d = root / "RepeatPreviousEasy" / variant
        write_metrics(str(d / "metrics.csv"), RETURNS if variant == "base" else RETURNS / 2)
        config = dataclasses.asdict(train.Config(env="RepeatPreviousEasy", lr=lr, num_seeds=2))
        (d / "config.json").write_text(json.dumps(config))
    report.main([str(root), "--budget", "640"])
    table = capsys.readouterr().out
    assert (
        "| RepeatPreviousEasy | base | shm | lr=0.001 | 640 | 2 | 50.0 ± 0.0 | 70.0 ± 20.0 |"
        in (table)
    )
    assert (
        "| RepeatPreviousEasy | low-lr | shm | lr=0.0001 | 640 | 2 | 25.0 ± 0.0 | 35.0 ± 10.0 |"
        in (table)
    )
    assert (root / "report-640.md").exists() and (root / "curves-640.png").exists()


def test_popgym_table_has_the_paper_cells_beside_ours(tmp_path):
    empty = popgym.popgym_table([])
    for (env, memory), (mean, std) in popgym.PAPER.items():
        paper = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
        assert any(
            env in line.split("|")[1] and f"| {memory} |" in line and f"| {paper} |" in line
            for line in empty.splitlines()
        ), (env, memory)

    d = tmp_path / "popgym" / "RepeatPreviousEasy" / "shm"
    write_metrics(str(d / "metrics.csv"), RETURNS)
    (d / "config.json").write_text(json.dumps({"memory": "shm", "preset": "paper-popgym"}))
    table = popgym.popgym_table(report.collect(str(tmp_path / "popgym")))
    row = "| RepeatPreviousEasy | shm | 42.5 ± 22.5 | 95.0 ± 5.0 | 88.9 ± 11.1 | 1,280 | 2 | paper-popgym |"
    assert row in table
    # The average over the tasks present (one here) is that task's numbers, beside the paper's.
    assert "| **Average** (1/12 tasks) | shm | 42.5 ± 22.5 | 95.0 ± 5.0 | -5.1 ± 6.3 |" in table


# ---------------------------------------------------------------------------------------------
# The grid, with train.run replaced by a fake
# ---------------------------------------------------------------------------------------------


def fake_outputs(cfg) -> dict:
    """What a complete run leaves in cfg.out, in small: config.json, params.msgpack and a
    metrics.csv whose seed s returns s/10 + u/U at update u."""
    U, S = cfg.num_updates, cfg.num_seeds
    returns = np.arange(S)[None] / 10 + (np.arange(U)[:, None] + 1) / U
    write_metrics(os.path.join(cfg.out, "metrics.csv"), returns, cfg.steps_per_update)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    with open(os.path.join(cfg.out, "params.msgpack"), "wb") as f:
        f.write(b"")
    return dict(compile_s=0.0, run_s=1.0, steps_per_s=float(U * S * cfg.steps_per_update))


def grid_argv(tmp_path, envs=("RepeatPreviousEasy", "AutoencodeEasy"), timesteps=128):
    return [
        "run",
        *("--envs", *envs, "--memories", "shm", "--seeds", "2", "--preset", "none"),
        *("--total-timesteps", str(timesteps), "--results", str(tmp_path / "results")),
        *("--runs", str(tmp_path / "runs"), "--", *TINY),
    ]


def test_grid_skips_finished_cells_and_continues_interrupted_ones(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(cfg, resume=False):
        calls.append((cfg, resume))
        return fake_outputs(cfg)

    monkeypatch.setattr(grid.lifecycle(), "run", fake_run)
    popgym.main(grid_argv(tmp_path))
    assert [(c.env, c.memory, c.num_seeds, c.num_envs, r) for c, r in calls] == [
        ("RepeatPreviousEasy", "shm", 2, 4, False),
        ("AutoencodeEasy", "shm", 2, 4, False),
    ]
    cfg = calls[0][0]
    assert cfg.out == str(tmp_path / "runs" / "results" / "RepeatPreviousEasy" / "shm")
    assert not cfg.progress
    results = tmp_path / "results"
    cell = results / "RepeatPreviousEasy" / "shm"
    assert sorted(os.listdir(cell)) == ["config.json", "metrics.csv", "summary.json"]
    summary = json.loads((cell / "summary.json").read_text())
    # 2 updates of 64 steps: final = the last update (1.0 and 1.1), MMER the same.
    assert summary["final_per_seed"] == pytest.approx([1.0, 1.1])
    assert summary["mmer_per_seed"] == pytest.approx([1.0, 1.1])
    assert summary["env_steps_per_seed"] == 128 and summary["seeds"] == 2
    assert {"wall_s", "steps_per_s", "jax", "backend"} <= set(summary)

    # Interrupted: AutoencodeEasy's run stopped midway (no params yet), RepeatPreviousEasy's
    # completed but was not recorded. Only the first trains again, continuing its run.
    for env in ("RepeatPreviousEasy", "AutoencodeEasy"):
        os.remove(results / env / "shm" / "summary.json")
    os.remove(tmp_path / "runs" / "results" / "AutoencodeEasy" / "shm" / "params.msgpack")
    calls.clear()
    popgym.main(grid_argv(tmp_path))
    assert [(c.env, r) for c, r in calls] == [("AutoencodeEasy", True)]
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["train_summary"] == {"reused_complete_run": True}
    assert summary["final_per_seed"] == pytest.approx([1.0, 1.1])
    assert (results / "AutoencodeEasy" / "shm" / "summary.json").exists()

    # Everything finished: nothing runs; a changed budget is named, not silently ignored.
    calls.clear()
    capsys.readouterr()
    popgym.main(grid_argv(tmp_path, timesteps=192))
    assert calls == []
    assert "total_timesteps: 128 -> 192" in capsys.readouterr().out

    # A cell whose scratch run has another config starts afresh, replacing that run.
    shutil.rmtree(results / "AutoencodeEasy")
    popgym.main(grid_argv(tmp_path, timesteps=192))
    assert [(c.env, c.total_timesteps, c.overwrite, r) for c, r in calls] == [
        ("AutoencodeEasy", 192, True, False)
    ]


# A worker process without jax: it writes what fake_outputs would (seed s returns s/10 + u/U)
# and records the cell; AutoencodeEasy's worker fails instead.
FAKE_WORKER = """
import csv, json, os, sys, types
sys.path.insert(0, {root!r})
from experiments import grid
spec = json.load(open(sys.argv[1]))
cfg = types.SimpleNamespace(**spec["config"])
if spec["env"] == "AutoencodeEasy":
    sys.exit(3)
n = cfg.num_envs * cfg.num_steps
U = cfg.total_timesteps // n
with open(os.path.join(cfg.out, "metrics.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["update", "seed", "env_steps", "steps_per_s", "episode_return"])
    w.writerows([u, s, u * n, 1.0, s / 10 + u / U] for u in range(1, U + 1) for s in range(2))
json.dump(spec["config"], open(os.path.join(cfg.out, "config.json"), "w"))
cell = grid.Cell(spec["env"], spec["variant"], cfg, spec["results_dir"])
grid.finish_cell(cell, 0.5, dict(run_s=1.0), dict(jax="none", backend="cpu"))
"""


def test_jobs_runs_cells_as_processes(tmp_path, monkeypatch, capsys):
    """--jobs 2: each cell is a process running the worker command; a failing one is reported
    (exit 1) and the other still finishes."""
    monkeypatch.setattr(
        grid,
        "worker_command",
        lambda spec: [sys.executable, "-c", FAKE_WORKER.format(root=ROOT), spec],
    )
    monkeypatch.setattr(grid, "POLL_S", 0.1)
    with pytest.raises(SystemExit) as exit_info:
        popgym.main(grid_argv(tmp_path)[:1] + ["--jobs", "2"] + grid_argv(tmp_path)[1:])
    assert exit_info.value.code == 1
    assert "1 cell(s) failed: AutoencodeEasy/shm" in capsys.readouterr().err
    summary = json.loads((tmp_path / "results/RepeatPreviousEasy/shm/summary.json").read_text())
    assert summary["final_per_seed"] == pytest.approx([1.0, 1.1])
    assert not (tmp_path / "results" / "AutoencodeEasy" / "shm" / "summary.json").exists()
    assert (tmp_path / "runs" / "results" / "AutoencodeEasy" / "shm" / "log.txt").exists()


@pytest.mark.parametrize(
    "flags,bad",
    [
        (["--envs", "RepeatPreviousEasy", "Nope"], "unknown env 'Nope'"),
        (["--memories", "shm", "lstm"], "unknown memory 'lstm'"),
        (["--preset", "fast"], "unknown preset 'fast'"),
        (["--", "--env", "AutoencodeEasy"], "--env after '--' is set by the grid"),
        (
            ["--envs", "AutoencodeEasy", "--", "--num-minibatches", "3"],
            "AutoencodeEasy/shm: --num-envs",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, flags, bad):
    monkeypatch.setattr(grid.lifecycle(), "run", lambda cfg: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit) as exit_info:
        popgym.main(["run", "--results", str(tmp_path / "r"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}") and err.count("\n") == 1
    if bad.startswith("unknown env"):
        assert "RepeatPreviousEasy" in err  # the valid ones are named
    assert not (tmp_path / "r").exists()


def test_one_real_tiny_cell_end_to_end(tmp_path, capsys):
    """A real run (GRU, 2 seeds x 4 updates of 64 steps): our summary agrees with the run's;
    recording a complete but unrecorded run again trains nothing."""
    argv = grid_argv(tmp_path, envs=("RepeatPreviousEasy",), timesteps=256)
    argv[argv.index("shm")] = "gru"
    popgym.main(argv)
    cell = tmp_path / "results" / "RepeatPreviousEasy" / "gru"
    assert sorted(os.listdir(cell)) == ["config.json", "metrics.csv", "summary.json"]
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["updates"] == 4 and summary["seeds"] == 2
    np.testing.assert_allclose(
        summary["final_per_seed"], summary["train_summary"]["final_per_seed"], rtol=1e-5
    )
    scratch = tmp_path / "runs" / "results" / "RepeatPreviousEasy" / "gru"
    assert (scratch / "params.msgpack").exists()

    os.remove(cell / "summary.json")
    popgym.main(argv)
    again = json.loads((cell / "summary.json").read_text())
    assert again["train_summary"] == {"reused_complete_run": True}
    assert again["final_per_seed"] == summary["final_per_seed"]

    popgym.main(["report", "--results", str(tmp_path / "results")])
    assert "| RepeatPreviousEasy | gru |" in capsys.readouterr().out
    assert (tmp_path / "results" / "report.md").exists()
    assert (tmp_path / "results" / "curves.png").exists()


def test_suites_build_their_cells_with_the_settings_that_matter(tmp_path, capsys):
    from experiments import suites

    args = suites.parser().parse_args(
        [
            "run",
            "credit_assignment",
            "--envs",
            "VisualMatch-500",
            "KeyToDoor-250",
            "--seeds",
            "2",
            "--results",
            str(tmp_path / "r"),
            "--runs",
            str(tmp_path / "g"),
        ]
    )
    cells = suites.build_cells("credit_assignment", args, [])
    variants = ("shm", "shm_abs_c0", "gru", "lru")
    assert [c.name for c in cells] == [
        f"{e}/{m}" for e in ("VisualMatch-500", "KeyToDoor-250") for m in variants
    ]
    by_name = {c.name: c.config for c in cells}
    # one rollout = one whole episode (15 + 500 + 10 and 10 + 250 + 3 steps)
    assert {by_name[f"VisualMatch-500/{m}"].num_steps for m in ("shm", "gru")} == {525}
    assert by_name["KeyToDoor-250/lru"].num_steps == 263
    shm = by_name["VisualMatch-500/shm"]
    assert (shm.memory_size, shm.theta_init, shm.num_seeds) == (24, "xavier", 2)
    bounded = by_name["KeyToDoor-250/shm_abs_c0"]
    assert (bounded.memory_size, bounded.theta_init, bounded.calib_init) == (
        24,
        "xavier_abs",
        "zeros",
    )
    assert shm.calib_init == "lecun"
    assert cells[0].results_dir == str(
        tmp_path / "r" / "credit_assignment" / "VisualMatch-500" / "shm"
    )
    assert cells[0].config.out == str(
        tmp_path / "g" / "credit_assignment" / "VisualMatch-500" / "shm"
    )

    meta = suites.build_cells("meta_rl", suites.parser().parse_args(["run", "meta_rl"]), [])
    assert {c.config.preset for c in meta} == {"meta"} and meta[0].config.lr == 3e-4
    sizes = suites.build_cells(
        "memory_size", suites.parser().parse_args(["run", "memory_size"]), []
    )
    assert sorted({c.config.mem_size for c in sizes}) == [8, 16, 32, 64, 128]
    # Every paper-agent ablation cell is a valid config (build_cells builds each network).
    paper = suites.build_cells(
        "paper_agent", suites.parser().parse_args(["run", "paper_agent"]), []
    )
    by_variant = {c.variant: c.config for c in paper}
    assert {c.agent for c in by_variant.values()} == {"paper"}
    base, swapped = by_variant["shm32"], by_variant["shm32_all_swapped"]
    assert (base.paper_bias_init, base.paper_feature_map, base.paper_input_norm) == (
        "torch",
        True,
        True,
    )
    assert (swapped.paper_bias_init, swapped.paper_feature_map, swapped.paper_heads) == (
        "zeros",
        False,
        "default",
    )
    assert by_variant["shm128_zero_bias_no_input_norm_append"].mem_size == 128
    assert (by_variant["shm128_single"].memory, by_variant["shm128_single"].mem_size) == (
        "shm_single",
        128,
    )

    for argv, words in (
        (["run", "nope"], "unknown suite 'nope'"),
        (["run", "calibration", "--envs", "RepeatFirstEasy"], "unknown env 'RepeatFirstEasy'"),
        (["run", "calibration", "--", "--memory-size", "8"], "set by the suite"),
    ):
        with pytest.raises(SystemExit) as stop:
            suites.main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_differences_skip_fields_that_do_nothing_in_a_cell():
    curves = report.Curves(np.arange(1, 3), np.zeros((2, 1)))
    configs = [
        dict(memory="shm", theta_init="xavier", lr=1e-3),
        dict(memory="gru", theta_init="xavier_abs", lr=1e-3),  # theta_init: no effect on a GRU
        dict(memory="shm_single", theta_init="xavier_abs", lr=3e-4),
    ]
    cells = [report.CellResult("E", str(i), "", c, curves, True) for i, c in enumerate(configs)]
    assert report.config_differences(cells) == [
        "lr=0.001, theta_init=xavier",
        "lr=0.001",
        "lr=0.0003, theta_init=xavier_abs",
    ]
    assert report.config_differences(cells[:2]) == ["—", "—"]


def test_memory_inputs_variance_shares():
    """`explained` is the between-group share of the variance: 1 when the groups determine x, 0
    when every group has the same mean, and the textbook value on a small worked case;
    `step_index` restarts at each reset."""
    from experiments.studies import memory_inputs

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 5)
    means = rng.normal(size=(4, 3))
    assert memory_inputs.explained(means[groups], groups) == pytest.approx(1.0)
    noise = rng.normal(size=(20, 3))
    same_means = noise - np.stack([noise[groups == g].mean(0) for g in groups])
    assert memory_inputs.explained(same_means, groups) == pytest.approx(0.0, abs=1e-12)
    # 1-d: x = [0, 2, 4, 6], groups {0, 0, 1, 1}: group means 1 and 5 about 3 -> 16 of 20
    x = np.array([[0.0], [2.0], [4.0], [6.0]])
    assert memory_inputs.explained(x, np.array([0, 0, 1, 1])) == pytest.approx(16 / 20)
    reset = np.array([True, False, False, True, False])
    np.testing.assert_array_equal(memory_inputs.step_index(reset), [0, 1, 2, 0, 1])


def scripted_repeat_previous(lag: int, episodes: int = 4) -> dict:
    """A replay dict (as `train.replay_episode` returns) of RepeatPreviousEasy played by a
    policy that names the suit shown `lag` steps back (suit 0 before there is one)."""
    env, params = envs.make("RepeatPreviousEasy")
    step = jax.jit(env.step_env)
    rec = {k: [] for k in ("obs", "reset", "action", "reward", "episode")}
    key = jax.random.PRNGKey(7)
    for e in range(episodes):
        key, k = jax.random.split(key)
        obs, state = env.reset_env(k, params)
        seen, done, first = [], False, True
        while not done:
            seen.append(int(np.argmax(obs)))
            action = seen[-1 - lag] if len(seen) > lag else 0
            key, k = jax.random.split(key)
            rec["obs"].append(np.asarray(obs))
            obs, state, reward, done, _ = step(k, state, action, params)
            rec["reset"].append(first)
            rec["action"].append(action)
            rec["reward"].append(reward)
            rec["episode"].append(e)
            first, done = False, bool(done)
    return {k: np.asarray(v, np.float32 if k == "reward" else None) for k, v in rec.items()}


def test_recall_names_the_lag_a_scripted_policy_answers_with():
    """On replays of scripted policies: the right one (lag 3 on Easy) scores accuracy 1 with
    lag_match[3] = 1; one that names the card 2 back has lag_match[2] = 1 and about chance
    elsewhere; a wrong k is refused rather than scored against the wrong card."""
    from experiments.studies import recall

    right = recall.recall_statistics(scripted_repeat_previous(3), k=4, max_lag=5)
    assert right["accuracy"] == 1.0 and right["lag_match"][3] == 1.0
    confusion = np.asarray(right["confusion"])
    assert confusion.sum() == right["scored_steps"] == 4 * 48
    assert np.count_nonzero(confusion - np.diag(np.diag(confusion))) == 0
    early = recall.recall_statistics(scripted_repeat_previous(2), k=4, max_lag=5)
    assert early["lag_match"][2] == 1.0
    assert early["accuracy"] == pytest.approx(early["lag_match"][3])
    others = [early["lag_match"][j] for j in (0, 1, 3, 4, 5)]
    assert max(others) < 0.45 and early["accuracy"] < 0.45
    with pytest.raises(ValueError, match="k = 3"):
        recall.recall_statistics(scripted_repeat_previous(3, episodes=1), k=3, max_lag=5)
