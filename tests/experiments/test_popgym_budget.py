"""`python -m experiments.popgym run --minutes N`: cells run in order within a time budget, and
none starts whose estimate exceeds the time left (`experiments.grid.run_within_budget`, with a
fake cell runner and a fake clock: no training runs); the estimates come from the throughput
measured on this device; `--order value` and the `shm_recipe` variant."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest

from experiments import grid, popgym

BUDGET_MIN = 10.0
DEFAULT = grid.Rate(100.0, 10.0, "default")  # 100 env steps/s and 10 s per cell
SCORES = dict(final_per_seed=[0.5], mmer_per_seed=[0.5])  # what a summary also holds


def cell(tmp_path, env: str, variant: str, steps: int) -> grid.Cell:
    """A cell of `steps` env steps (1 seed, 1 update) whose results go under tmp_path."""
    cfg = types.SimpleNamespace(num_updates=1, steps_per_update=steps, num_seeds=1)
    return grid.Cell(env, variant, cfg, str(tmp_path / env / variant))


class FakeRunner:
    """Runs a cell by advancing a fake clock by its true duration; returns a summary whose
    throughput says that duration (10 s of overhead, the rest training)."""

    def __init__(self, durations: dict[str, float]):
        self.durations, self.now, self.calls = durations, 0.0, []

    def clock(self) -> float:
        return self.now

    def __call__(self, cell: grid.Cell) -> dict:
        self.calls.append((cell.name, self.now))
        wall = self.durations[cell.name]
        self.now += wall
        steps = grid.cell_steps(cell)
        sps = steps / (wall - 10)
        return dict(seeds=1, env_steps_per_seed=steps, wall_s=wall, steps_per_s=sps, **SCORES)


@pytest.fixture
def estimates(monkeypatch):
    """Every estimate the budget makes: [(cell name, seconds)]."""
    seen = []
    estimate_s = grid.Rates.estimate_s

    def spy(self, cell):
        result = estimate_s(self, cell)
        seen.append((cell.name, result[0]))
        return result

    monkeypatch.setattr(grid.Rates, "estimate_s", spy)
    monkeypatch.setitem(grid.DEFAULT_RATES, "cpu", DEFAULT)
    return seen


def test_cells_run_in_order_and_none_starts_that_the_estimate_says_cannot_finish(
    tmp_path, estimates
):
    cells = [
        cell(tmp_path, "E1", "shm", 1_000),  # default: 10 + 10 = 20 s; takes 30 (50 steps/s)
        cell(tmp_path, "E2", "shm", 20_000),  # shm's rate: 1.1 (10 + 400) = 451 <= 570; takes 420
        cell(tmp_path, "E3", "shm", 10_000),  # 1.1 (10 + 205) = 236.5 > 150 left: not started
        cell(tmp_path, "E1", "gru", 1_000),  # default: 20 s <= 150; takes 20 (100 steps/s)
        cell(tmp_path, "E2", "gru", 20_000),  # 1.1 (10 + 200) = 231 > 130 left: not started
        cell(tmp_path, "E3", "gru", 100),  # 1.1 (10 + 1) = 12.1 <= 130; takes 11
    ]
    runner = FakeRunner({"E1/shm": 30, "E2/shm": 420, "E1/gru": 20, "E3/gru": 11})
    logged = []
    result = grid.run_within_budget(
        cells, BUDGET_MIN, log=logged.append, run=runner, clock=runner.clock, backend="cpu"
    )
    started = [name for name, _ in runner.calls]
    assert started == ["E1/shm", "E2/shm", "E1/gru", "E3/gru"]  # in the given order
    assert result.ran == started and result.failed == []
    assert result.not_started == ["E3/shm", "E2/gru"]
    # The budget accounting: the time used is the cells' durations, and each estimate was
    # compared with what was left at that moment.
    assert result.used_s == pytest.approx(30 + 420 + 20 + 11)
    start_of = dict(runner.calls)
    finished_before = {"E3/shm": 450, "E2/gru": 470}  # clock when the cell came up
    for name, estimate in estimates:
        if name in start_of:
            assert estimate <= BUDGET_MIN * 60 - start_of[name], name
        else:
            assert estimate > BUDGET_MIN * 60 - finished_before[name], name
    assert dict(estimates) == pytest.approx(
        {
            "E1/shm": 20,
            "E2/shm": 1.1 * 410,
            "E3/shm": 1.1 * (10 + 10_000 * 410 / 20_000),  # E2's rate, the slower shm one
            "E1/gru": 20,
            "E2/gru": 1.1 * 210,
            "E3/gru": 1.1 * 11,
        }
    )
    assert any("E3/shm not started: estimated 3.9 min" in line for line in logged)
    assert "rerun with a larger --minutes" in logged[-1]


def test_estimates_come_from_recorded_cells_on_this_device(tmp_path, estimates):
    """A finished cell's summary.json (same device) sets the first estimate; one from another
    backend does not; a failing cell is reported and the budget goes on."""
    done = cell(tmp_path, "E0", "shm", 1_000)
    other = cell(tmp_path, "E0", "gru", 1_000)
    for c, backend, sps in ((done, "cpu", 10.0), (other, "gpu", 1e9)):
        summary = dict(seeds=1, env_steps_per_seed=1_000, wall_s=110, steps_per_s=sps)
        summary.update(backend=backend, device="cpu")
        grid.report.write_atomic(grid.summary_path(c), json.dumps(summary))
    pending = [cell(tmp_path, "E1", "shm", 5_000), cell(tmp_path, "E1", "gru", 1_000)]

    def run(c):
        raise RuntimeError("boom")

    result = grid.run_within_budget(
        [done, other, *pending], BUDGET_MIN, log=lambda line: None, run=run,
        clock=lambda: 0.0, backend="cpu", device="cpu",
    )  # fmt: skip
    # E1/shm: 10 steps/s and 110 - 100 = 10 s overhead -> 1.1 (10 + 500) = 561 s <= 600
    # E1/gru: the gpu summary is ignored -> the default, 20 s
    assert dict(estimates) == pytest.approx({"E1/shm": 561.0, "E1/gru": 20.0})
    assert result.failed == ["E1/shm", "E1/gru"] and result.ran == []
    assert result.not_started == []


def test_value_order_and_the_recipe_variant(tmp_path):
    """--order value: RepeatPreviousEasy, AutoencodeEasy for shm, shm_recipe, gru, then the
    other Easy tasks, Medium, Hard, then ffm; shm_recipe is SHM with the recipe's settings."""
    envs = ["BattleshipHard", "AutoencodeEasy", "ConcentrationMedium", "RepeatPreviousEasy"]
    by_value = ["RepeatPreviousEasy", "AutoencodeEasy", "ConcentrationMedium", "BattleshipHard"]
    ffm = ["ffm"] if "ffm" in popgym.default_memories() else []  # where the registry has it
    argv = ["run", "--envs", *envs, "--memories", "gru", *ffm, "shm_recipe", "shm"]
    argv += ["--order", "value", "--preset", "none", "--results", str(tmp_path / "r")]
    args = popgym.parser().parse_args(argv + ["--runs", str(tmp_path / "runs")])
    cells = popgym.build_cells(args, ["--num-envs", "4", "--num-steps", "8", "--hidden", "16"])
    expected = [f"{e}/{m}" for e in by_value for m in ("shm", "shm_recipe", "gru")]
    expected += [f"{e}/ffm" for e in by_value if ffm]
    assert [c.name for c in cells] == expected
    recipe = next(c.config for c in cells if c.variant == "shm_recipe")
    plain = next(c.config for c in cells if c.variant == "shm" and c.env == recipe.env)
    for field, value in popgym.VARIANTS["shm_recipe"].items():
        assert getattr(recipe, field) == value, field
    changed = {
        f.name
        for f in dataclasses.fields(recipe)
        if getattr(recipe, f.name) != getattr(plain, f.name)
    }
    assert changed - {"out"} <= set(popgym.VARIANTS["shm_recipe"])


@pytest.mark.parametrize(
    "flags, bad",
    [
        (["--minutes", "5", "--jobs", "2"], "--minutes runs cells one at a time"),
        (["--minutes", "0"], "--minutes runs cells one at a time"),
        (["--order", "best"], "unknown order 'best'"),
        (["--memories", "shm_recip"], "unknown memory 'shm_recip'"),
    ],
)
def test_bad_budget_input_exits_2_with_one_line(tmp_path, capsys, flags, bad):
    with pytest.raises(SystemExit) as exit_info:
        popgym.main(["run", "--envs", "RepeatPreviousEasy", "--results", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}") and err.count("\n") == 1


def test_cli_minutes_runs_what_fits(tmp_path, monkeypatch, capsys):
    """Through the CLI: with a budget no cell fits, nothing runs; with time enough, every cell
    runs, in value order."""
    calls = []

    def fake_run_cell(c):
        calls.append(c.name)
        return dict(seeds=1, env_steps_per_seed=1, wall_s=0.01, steps_per_s=1e9, **SCORES)

    monkeypatch.setattr(grid, "run_cell", fake_run_cell)
    argv = ["run", "--envs", "AutoencodeEasy", "RepeatPreviousEasy", "--memories", "gru", "shm",
            "--order", "value", "--preset", "none", "--results", str(tmp_path / "r"),
            "--runs", str(tmp_path / "runs"), "--minutes", "1", "--total-timesteps", "64",
            "--", "--num-envs", "4", "--num-steps", "8", "--hidden", "16"]  # fmt: skip
    monkeypatch.setitem(grid.DEFAULT_RATES, "cpu", grid.Rate(0.01, 0.0, "slow"))
    monkeypatch.setitem(grid.DEFAULT_RATES, "gpu", grid.Rate(0.01, 0.0, "slow"))
    popgym.main(argv)
    assert calls == []
    assert "4 cell(s) not started within 1 min" in capsys.readouterr().out
    monkeypatch.setitem(grid.DEFAULT_RATES, "cpu", grid.Rate(1e9, 0.0, "fast"))
    monkeypatch.setitem(grid.DEFAULT_RATES, "gpu", grid.Rate(1e9, 0.0, "fast"))
    popgym.main(argv)
    assert calls == [
        "RepeatPreviousEasy/shm",
        "RepeatPreviousEasy/gru",
        "AutoencodeEasy/shm",
        "AutoencodeEasy/gru",
    ]
