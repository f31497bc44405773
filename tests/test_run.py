"""Tests of run.py, the run's lifecycle: Ctrl-C (once: finish the segment, save, exit 130 with
the resume command; twice: at once) and --resume ending bit-identical to the run left alone,
checkpoints that are never half-written, --out checks before compiling, live TensorBoard / W&B
logs, the summary, --eval's first-episode rule and --list. One tiny config, compiled once per
session: the run left alone, then an interrupted run over three sessions."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import struct
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run
import train
from train import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 25 updates in segments of 3: the last segment runs 1 update (the skipped-update branch).
TINY = Config(
    env="RepeatPreviousEasy",
    memory="shm",
    memory_size=8,
    hidden=16,
    num_envs=4,
    num_steps=16,
    num_minibatches=2,
    num_epochs=1,
    total_timesteps=4 * 16 * 25,
    checkpoint_every=3,
    progress=False,
)
FLAGS = ["--env", "RepeatPreviousEasy", "--memory", "shm", "--memory-size", "8", "--hidden", "16",
         "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2", "--num-epochs", "1",
         "--total-timesteps", str(4 * 16 * 25), "--checkpoint-every", "3", "--no-progress"]  # fmt: skip


class FakeWandb(types.SimpleNamespace):
    """Stands in for the wandb package: records what the run logs."""

    def __init__(self):
        super().__init__(inits=[], logs=[], finished=0)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(id="fake-id", log=self._log, finish=self._finish)

    def _log(self, row, step):
        self.logs.append((step, row))

    def _finish(self):
        self.finished += 1


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory):
    """The uninterrupted run (with W&B replaced by FakeWandb)."""
    cfg = dataclasses.replace(TINY, out=str(tmp_path_factory.mktemp("runs") / "alone"), wandb=True)
    fake = FakeWandb()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "wandb", fake)
        summary = run.run(cfg)
    return cfg, summary, fake


def read_rows(directory) -> list[dict]:
    with open(os.path.join(directory, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def tensorboard_scalars(directory) -> dict[str, list[int]]:
    """{tag: [steps]} from the TFRecord event files in directory (tensorboardX's protos), and
    "purge": the steps of the session-start markers a resumed run writes (purge_step)."""
    from tensorboardX.proto.event_pb2 import Event

    tags: dict[str, list[int]] = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                tags.setdefault("purge", []).append(event.step)  # a resume's purge_step
    return tags


def test_summary_outputs_and_live_logs(left_alone):
    cfg, summary, fake = left_alone
    assert sorted(os.listdir(cfg.out)) == [
        "checkpoints", "config.json", "metrics.csv", "params.msgpack", "returns.png",
        "tensorboard", "wandb_id.txt",
    ]  # fmt: skip
    for key in ("final", "final_std", "final_per_seed", "compile_s", "run_s", "steps_per_s"):
        assert key in summary
    assert summary["random_return"] == pytest.approx(summary["random_metrics"]["episode_return"])
    assert summary["state_size"] == 8 * 8  # SHM: H x H
    assert summary["params"] == sum(x.size for x in jax.tree.leaves(run.load_run(cfg.out)[1]))
    rows = read_rows(cfg.out)
    assert [int(r["update"]) for r in rows] == list(range(1, cfg.num_updates + 1))
    # A checkpoint every 3 updates (a segment each) and at the end; the last two are kept.
    assert sorted(int(n) for n in os.listdir(os.path.join(cfg.out, "checkpoints"))) == [24, 25]
    # TensorBoard and W&B got every update's seed-mean metrics, at env steps per seed.
    steps = [u * cfg.steps_per_update for u in range(1, cfg.num_updates + 1)]
    scalars = tensorboard_scalars(os.path.join(cfg.out, "tensorboard"))
    assert scalars["policy_loss"] == steps and scalars["value_loss"] == steps
    assert [step for step, _ in fake.logs] == steps and "policy_loss" in fake.logs[0][1]
    assert fake.inits[0]["project"] == "shm-jax" and fake.finished == 1


def test_ctrl_c_and_resume_end_bit_identical(left_alone, tmp_path, capsys):
    """Session 1 (CLI): Ctrl-C once -> finishes the segment, saves, exit 130 and one line with
    the resume command. Session 2: resumed, then Ctrl-C twice -> stops at once, before saving
    the segment it ran. A stray temporary checkpoint is then left, as a crash would. Session 3
    (CLI): --resume to the end. Final params and metrics.csv equal the run left alone's."""
    alone, _, _ = left_alone
    out = str(tmp_path / "interrupted")
    proc = subprocess.Popen(
        [sys.executable, "train.py", *FLAGS, "--out", out],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    csv_path = os.path.join(out, "metrics.csv")
    while proc.poll() is None and not (os.path.exists(csv_path) and os.path.getsize(csv_path)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-3000:]
    assert "compiling" in stdout and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped at update ")
    assert last.endswith(f"python train.py --resume {out}")
    first_stop = int(last.split()[3].split("/")[0])
    assert 0 < first_stop < TINY.num_updates and first_stop % 3 == 0
    assert run.last_complete_checkpoint(out) == first_stop

    # Session 2, in this process: a real SIGINT twice, right after its first segment's rows.
    append_csv = run.append_csv

    def append_then_ctrl_c_twice(*args):
        append_csv(*args)
        os.kill(os.getpid(), signal.SIGINT)  # first: finish the segment ...
        os.kill(os.getpid(), signal.SIGINT)  # second: ... no, stop now

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "append_csv", append_then_ctrl_c_twice)
        with pytest.raises(run.RunInterrupted) as stop:
            run.run(run.load_config(out), resume=True)
    assert stop.value.at_once
    assert "stopped at once" in str(stop.value) and f"update {first_stop}/" in str(stop.value)
    assert len(read_rows(out)) == first_stop + 3  # rows past the checkpoint, dropped on resume
    assert "press Ctrl-C again" in capsys.readouterr().err
    # An interrupted run can be evaluated from its checkpoint.
    cfg, params = run.load_run(out)
    assert jax.tree.leaves(params)[0].shape[0] == cfg.num_seeds
    # A half-written checkpoint (orbax writes into a temporary directory, then renames it).
    stray = os.path.join(out, "checkpoints", "99.orbax-checkpoint-tmp-1700000000")
    os.makedirs(stray)
    with open(os.path.join(stray, "junk"), "w") as f:
        f.write("half")

    result = subprocess.run(
        [sys.executable, "train.py", "--resume", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final episode_return" in result.stdout

    with open(os.path.join(alone.out, "params.msgpack"), "rb") as a:
        with open(os.path.join(out, "params.msgpack"), "rb") as b:
            assert a.read() == b.read(), "final params differ"
    rows_alone, rows = read_rows(alone.out), read_rows(out)
    assert len(rows) == len(rows_alone) == TINY.num_updates
    for a, b in zip(rows_alone, rows, strict=True):
        a.pop("steps_per_s"), b.pop("steps_per_s")
        assert a == b
    # Each resumed session told TensorBoard to drop the events past its checkpoint.
    purges = tensorboard_scalars(os.path.join(out, "tensorboard"))["purge"]
    assert purges == [first_stop * TINY.steps_per_update + 1] * 2


def test_out_checked_before_compiling(left_alone, tmp_path, capsys):
    alone, _, _ = left_alone
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (alone.out, ["already holds a run", f"--resume {alone.out}", "--overwrite"]),
        (str(a_file), ["is a file"]),
        (str(a_file / "run"), ["not writable"]),
    ]
    for out, needles in cases:
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as exit_info:
            run.main([*FLAGS, "--out", out])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
        assert time.perf_counter() - t0 < 10  # nothing was compiled
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--resume", alone.out])
    assert exit_info.value.code == 2 and "complete" in capsys.readouterr().err


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed"
)
def test_wandb_missing_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main([*FLAGS, "--wandb", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_eval_flags(left_alone, capsys):
    cfg, _, _ = left_alone
    run.main(["--eval", cfg.out, "--episodes", "8", "--greedy", "--seed", "3"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "8 episodes, greedy actions" in line and "random policy" in line
    result = run.evaluate_run(cfg.out, episodes=8, seed=3)
    assert result["metrics"]["episodes"] == [8]
    assert set(result["metrics"]) >= {"episode_return", "episode_length"}


def test_eval_counts_each_envs_first_episode_only():
    """On MineSweeperEasy (episodes of random length) the random policy's mean return over each
    env's first episode equals that of independent single episodes; counting every episode
    that finishes within the horizon over-weights short ones (-0.287 against -0.225)."""
    cfg = dataclasses.replace(TINY, env="MineSweeperEasy")
    setup = train.make_env_and_network(cfg)
    n = 4096
    evaluate = train.make_evaluate(cfg, setup, n, random_policy=True)
    result = jax.device_get(jax.jit(evaluate)(None, jax.random.key(0)))
    assert int(result["episodes"]) == n
    assert {"episode_return", "episode_length", "episode_success"} <= set(result)

    env, params = setup.env, setup.env_params
    space = env.action_space(params)

    def one_episode(key):  # no auto-reset: step one env until its episode ends
        key, key_reset = jax.random.split(key)
        _, state = env.reset_env(key_reset, params)

        def step(carry, key):
            state, ret, done = carry
            key_act, key_step = jax.random.split(key)
            action = space.sample(key_act)
            _, new, reward, terminated, _ = env.step_env(key_step, state, action, params)
            ret = ret + jnp.where(done, 0.0, reward)
            state = jax.tree.map(lambda a, b: jnp.where(done, a, b), state, new)
            return (state, ret, done | terminated | env.is_truncated(new, params)), None

        horizon = int(params.max_steps_in_episode)
        (_, ret, done), _ = jax.lax.scan(step, (state, 0.0, False), jax.random.split(key, horizon))
        return ret, done

    ret, done = jax.jit(jax.vmap(one_episode))(jax.random.split(jax.random.key(1), n))
    assert bool(done.all())
    # Standard error of the difference ~0.007; the horizon rule is off by ~0.06.
    assert abs(float(result["episode_return"]) - float(ret.mean())) < 0.03


def test_auto_segments_and_checkpoints_scale_with_the_work_per_update():
    """~5 s segments and ~3 min between checkpoints on a 2-core CPU, whatever the config."""
    default, popgym = Config(), train.PRESETS["popgym"]
    assert (run.segment_length(default), run.checkpoint_interval(default)) == (26, 819)
    assert (run.segment_length(popgym), run.checkpoint_interval(popgym)) == (1, 8)
    assert run.segment_length(dataclasses.replace(default, checkpoint_every=10)) == 10
    assert (run.segment_length(TINY), run.checkpoint_interval(TINY)) == (3, 3)


def test_list_prints_env_ids_and_memories(capsys):
    run.main(["--list"])
    out = capsys.readouterr().out
    for name in ("shm", "gru", "RepeatPreviousEasy", "VisualMatch-250", "MemoryChain-bsuite"):
        assert name in out


def test_nonfinite_warning_names_the_update_seed_and_fix():
    finite = {"grad_norm": np.ones((3, 2)), "value_loss": np.ones((3, 2))}
    assert run.nonfinite_warning(TINY, 10, finite) is None
    bad = {"grad_norm": np.ones((3, 2)), "value_loss": np.ones((3, 2))}
    bad["value_loss"][1, 1] = np.nan
    bad["grad_norm"][2, 0] = np.inf
    abs_lecun = dataclasses.replace(TINY, theta_init="xavier_abs", calib_init="lecun")
    line = run.nonfinite_warning(abs_lecun, 10, bad)
    assert "update 12, seed 1" in line and "--theta-init xavier" in line  # the first bad row
    assert "--calib-init zeros" in line
    bounded = dataclasses.replace(TINY, theta_init="xavier_abs", calib_init="zeros")
    assert "--calib-init" not in run.nonfinite_warning(bounded, 10, bad)
    gru = run.nonfinite_warning(dataclasses.replace(TINY, memory="gru"), 0, bad)
    assert "update 2, seed 1" in gru and "--theta-init" not in gru and "\n" not in gru
