"""Tests of sac.py, recurrent SAC / SAC-D: its losses against hand computations, the tanh-Gaussian
log-probability against a numerical change of variables, the episode buffer (a sampled sequence
is one episode from its start, never two), a run through run.py whose --resume ends
bit-identical to the run left alone, SAC-D end to end, and bad input refused before compiling.
The learning check on Pendulum is marked slow."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from gymnax.environments import environment, spaces

import run
import sac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Wind (continuous, held-out tasks, goal-terminal steps): 1 random + 6 training iterations in
# segments of 2 (the last segment runs 1 iteration: the skipped-iteration branch).
TINY = dataclasses.replace(
    sac.PRESETS["meta-wind"],
    memory_features=8,
    obs_embed=8,
    action_embed=4,
    hidden=16,
    batch_size=2,
    rollouts_per_iter=2,
    random_rollouts=2,
    num_iters=6,
    updates_per_iter=2,
    eval_every=2,
    eval_episodes=4,
    checkpoint_every=2,
    progress=False,
)


# ---------------------------------------------------------------------------------------------
# Losses against hand computations
# ---------------------------------------------------------------------------------------------


def test_critic_target_takes_the_twin_minimum_and_the_entropy_term():
    q1, q2 = jnp.array([1.0, 5.0, -2.0]), jnp.array([2.0, 3.0, -1.0])
    log_pi, alpha = jnp.array([-0.5, 0.2, 1.0]), 0.3
    v = sac.soft_value(q1, q2, log_pi, alpha)
    np.testing.assert_allclose(v, [1.0 + 0.15, 3.0 - 0.06, -2.0 - 0.3], rtol=1e-6)
    reward, terminal = jnp.array([0.5, 1.0, 0.0]), jnp.array([0.0, 1.0, 0.0])
    y = sac.td_target(reward, terminal, v, gamma=0.9)
    np.testing.assert_allclose(y, [0.5 + 0.9 * 1.15, 1.0, 0.9 * -2.3], rtol=1e-6)


def test_sac_d_expectations_over_the_action_distribution():
    rng = np.random.default_rng(0)
    q1, q2, logits = (rng.normal(size=(3, 4)) for _ in range(3))
    alpha = 0.1
    pi = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    q = np.minimum(q1, q2)
    v_hand = [
        sum(pi[i, a] * (q[i, a] - alpha * np.log(pi[i, a])) for a in range(4)) for i in range(3)
    ]
    np.testing.assert_allclose(sac.soft_value_discrete(q1, q2, logits, alpha), v_hand, rtol=1e-5)
    mask = np.array([1.0, 1.0, 0.0])  # the third step is past the episode's end
    per_step = [
        sum(pi[i, a] * (alpha * np.log(pi[i, a]) - q[i, a]) for a in range(4)) for i in range(3)
    ]
    loss = sac.actor_loss_discrete(q1, q2, logits, alpha, mask)
    np.testing.assert_allclose(loss, (per_step[0] + per_step[1]) / 2, rtol=1e-5)
    # The policy gradient flows through π only, not through Q.
    grad_q = jax.grad(lambda q: sac.actor_loss_discrete(q, q2, logits, alpha, mask))(q1)
    assert not np.asarray(grad_q).any()


def test_actor_critic_and_temperature_losses():
    q1, q2 = jnp.array([1.0, 4.0]), jnp.array([3.0, 2.0])
    log_pi, mask = jnp.array([-1.0, 0.5]), jnp.array([1.0, 1.0])
    np.testing.assert_allclose(
        sac.actor_loss(q1, q2, log_pi, 0.2, mask), ((-0.2 - 1.0) + (0.1 - 2.0)) / 2, rtol=1e-6
    )
    y = jnp.array([2.0, 2.0])
    np.testing.assert_allclose(
        sac.critic_loss(q1, q2, y, jnp.array([1.0, 0.0])), (1.0 - 2.0) ** 2 + (3.0 - 2.0) ** 2
    )
    # J(α) = -α (E log π + H̄), H̄ the target entropy: α grows while the entropy -E log π is
    # below H̄ and shrinks while it is above.
    log_alpha = jnp.log(0.5)
    np.testing.assert_allclose(
        sac.temperature_loss(log_alpha, -1.0, -2.0), -0.5 * (-1.0 - 2.0), rtol=1e-6
    )
    assert jax.grad(sac.temperature_loss)(log_alpha, -1.0, 2.0) < 0  # entropy 1 < 2: raise α
    assert jax.grad(sac.temperature_loss)(log_alpha, -1.0, -2.0) > 0  # entropy 1 > -2: lower α


def test_tanh_gaussian_log_prob_is_the_change_of_variables():
    """exp(log π(a)) equals the Gaussian density of u = atanh(a) times |du/da|, computed by
    central differences in float64, and integrates to 1 over (-1, 1)."""
    mean, log_std = 0.3, -0.2
    a = np.linspace(-0.995, 0.995, 2001)
    u = np.arctanh(a)
    h = 1e-6
    du_da = (np.arctanh(a + h) - np.arctanh(a - h)) / (2 * h)
    sigma = np.exp(log_std)
    gauss = np.exp(-0.5 * ((u - mean) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    ours = np.exp(
        sac.tanh_gaussian_log_prob(
            jnp.asarray(u, jnp.float32)[:, None], jnp.float32(mean), jnp.float32(log_std)
        )
    )
    np.testing.assert_allclose(ours, gauss * du_da, rtol=2e-4)
    assert abs(np.trapezoid(ours, a) - 1.0) < 1e-3
    # Two components: the log-densities add; far in the tail the correction stays finite.
    u2 = jnp.array([[0.4, -1.3]])
    both = sac.tanh_gaussian_log_prob(u2, jnp.zeros(2), jnp.zeros(2))
    parts = [sac.tanh_gaussian_log_prob(u2[:, i : i + 1], 0.0, 0.0) for i in range(2)]
    np.testing.assert_allclose(both, parts[0] + parts[1], rtol=1e-6)
    assert np.isfinite(sac.tanh_gaussian_log_prob(jnp.array([[30.0]]), 0.0, 0.0)).all()
    # A sample's log π is that of its pre-tanh value.
    action, log_pi = sac.tanh_gaussian_sample(jax.random.key(0), jnp.zeros((5, 2)), jnp.zeros(2))
    assert action.shape == (5, 2) and np.all(np.abs(action) < 1)
    np.testing.assert_allclose(
        log_pi, sac.tanh_gaussian_log_prob(jnp.arctanh(action), 0.0, 0.0), rtol=1e-3, atol=1e-3
    )


def test_polyak_update():
    target = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.0)}
    online = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(10.0)}
    out = sac.polyak(target, online, 0.25)
    np.testing.assert_allclose(out["w"], [1.5, 1.5])
    np.testing.assert_allclose(out["b"], 2.5)


# ---------------------------------------------------------------------------------------------
# Episodes and the buffer
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class CountState(environment.EnvState):
    length: jax.Array
    episode_id: jax.Array


class CountEnv(environment.Environment):
    """obs = (step in the episode, episode id); episodes of random length 2..15, terminated at
    their length or truncated at 12 steps; reward 1 per step."""

    @property
    def default_params(self):
        return environment.EnvParams(max_steps_in_episode=12)

    def reset_env(self, key, params):
        k1, k2 = jax.random.split(key)
        state = CountState(
            time=jnp.int32(0),
            length=jax.random.randint(k1, (), 2, 16),
            episode_id=jax.random.randint(k2, (), 1, 1_000_000),
        )
        return jnp.array([0.0, state.episode_id], jnp.float32), state

    def step_env(self, key, state, action, params):
        state = state.replace(time=state.time + 1)
        obs = jnp.array([state.time, state.episode_id], jnp.float32)
        return obs, state, jnp.float32(1.0), state.time >= state.length, {}

    def action_space(self, params=None):
        return spaces.Discrete(4)

    def observation_space(self, params=None):
        return spaces.Box(-jnp.inf, jnp.inf, (2,), jnp.float32)


def test_sampled_sequences_are_whole_episodes_from_their_start():
    """Four iterations of 8 episodes into a ring of 20 (it wraps); every sampled sequence is one
    episode: step t shows its step index t and one episode id, the episode's steps are a prefix
    (valid), terminal only where it terminated (not where it was truncated), and the memories
    reset at t = 0 and nowhere else."""
    cfg = dataclasses.replace(
        TINY, env="RepeatFirstEasy", preset="none", batch_size=16, terminal_at_goal=False
    )
    setup = sac.make_env_and_network(cfg)
    env = CountEnv()
    setup = setup._replace(env=env, env_params=env.default_params, horizon=12, obs_dim=2)
    import flashbax as fbx

    buffer = fbx.make_item_buffer(
        max_length=20, min_length=1, sample_batch_size=16, add_batches=True
    )

    @jax.jit
    def fill_and_sample(key):
        def collect(key):
            return sac.run_episodes(setup, None, key, env.default_params, 8, "random", cfg)[0]

        keys = jax.random.split(key, 5)
        example = jax.tree.map(lambda x: x[0], collect(keys[0]))
        state = buffer.init(example)
        for k in keys[:4]:
            state = buffer.add(state, collect(k))
        batch = buffer.sample(state, keys[4]).experience
        return sac.replay_inputs(setup, batch)

    batch, (obs, prev_action, prev_reward, resets) = jax.device_get(
        fill_and_sample(jax.random.key(0))
    )
    L, B = batch.reward.shape
    assert obs.shape == (L + 1, B, 2) and prev_action.shape == (L + 1, B, 4)
    assert resets[0].all() and not resets[1:].any()
    assert not prev_action[0].any() and not prev_reward[0].any()
    for b in range(B):
        n = int(batch.valid[:, b].sum())
        assert batch.valid[:n, b].all() and not batch.valid[n:, b].any()  # a prefix
        steps, ids = obs[: n + 1, b, 0], obs[: n + 1, b, 1]
        np.testing.assert_array_equal(steps, np.arange(n + 1))  # starts at an episode start
        assert ids[0] > 0 and (ids == ids[0]).all()  # one episode, never two
        assert not obs[n + 1 :, b].any()
        terminated = n < 12 or batch.terminal[n - 1, b]
        assert batch.terminal[:, b].sum() == (1 if terminated else 0)
        np.testing.assert_array_equal(batch.reward[:, b], batch.valid[:, b])
    assert batch.valid.sum(0).max() == 12 and batch.valid.sum(0).min() < 12  # both ends seen

    # --terminal-at-goal: every rewarded step is stored as terminal.
    goal = dataclasses.replace(cfg, terminal_at_goal=True)
    ep, _ = sac.run_episodes(setup, None, jax.random.key(1), env.default_params, 4, "random", goal)
    np.testing.assert_array_equal(ep.terminal, ep.valid)


def test_pixel_observations_are_stored_as_bytes():
    cfg = dataclasses.replace(sac.PRESETS["credit"], env="VisualMatch-100", batch_size=4)
    program = sac.make_train(cfg)
    runner = jax.eval_shape(program.init, sac.make_keys(cfg))
    obs = runner.buffer.experience.obs
    assert obs.dtype == jnp.uint8 and obs.shape[-2:] == (125 + 1, 75)
    assert runner.buffer.experience.action.dtype == jnp.int32


# ---------------------------------------------------------------------------------------------
# Runs through run.py
# ---------------------------------------------------------------------------------------------


def read_rows(directory) -> list[dict]:
    with open(os.path.join(directory, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory):
    cfg = dataclasses.replace(TINY, out=str(tmp_path_factory.mktemp("sac") / "alone"))
    return cfg, run.run(cfg)


def test_run_writes_the_algorithm_and_metrics(left_alone):
    cfg, summary = left_alone
    with open(os.path.join(cfg.out, "config.json")) as f:
        assert json.load(f)["algorithm"] == "sac"
    assert isinstance(run.load_config(cfg.out), sac.Config)
    rows = read_rows(cfg.out)
    assert [int(r["update"]) for r in rows] == list(range(1, cfg.num_updates + 1))
    assert int(rows[-1]["env_steps"]) == cfg.num_updates * 2 * 100
    assert rows[0]["critic_loss"] == "" and rows[0]["grad_updates"] == "0"  # the random start
    assert all(np.isfinite(float(r["critic_loss"])) for r in rows[1:])
    assert [r["eval_return"] != "" for r in rows] == [(u % 2 == 0) or u == 7 for u in range(1, 8)]
    assert np.isfinite(summary["final"]) and summary["state_size"] == 24 * 24  # SHM(24)
    assert sorted(int(n) for n in os.listdir(os.path.join(cfg.out, "checkpoints"))) == [6, 7]


def test_resume_ends_bit_identical(left_alone, tmp_path):
    """Session 1: Ctrl-C while the first segment's rows are written (the second segment is
    running) -> it finishes that segment, saves at iteration 4 and stops. Session 2 (the CLI):
    --resume to the end. Final params and metrics.csv equal the run left alone's."""
    alone, _ = left_alone
    cfg = dataclasses.replace(TINY, out=str(tmp_path / "interrupted"))
    append_csv = run.append_csv
    pressed = []

    def append_then_ctrl_c(*args):
        append_csv(*args)
        if not pressed:
            pressed.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "append_csv", append_then_ctrl_c)
        with pytest.raises(run.RunInterrupted) as stop:
            run.run(cfg)
    assert not stop.value.at_once and "stopped at update 4/7" in str(stop.value)
    assert str(stop.value).endswith(f"python sac.py --resume {cfg.out}")
    assert run.last_complete_checkpoint(cfg.out) == 4 and len(read_rows(cfg.out)) == 4
    run.main(["--resume", cfg.out, "--no-progress"])
    with open(os.path.join(alone.out, "params.msgpack"), "rb") as a:
        with open(os.path.join(cfg.out, "params.msgpack"), "rb") as b:
            assert a.read() == b.read(), "final params differ"
    rows_alone, rows = read_rows(alone.out), read_rows(cfg.out)
    assert len(rows) == len(rows_alone) == TINY.num_updates
    for a, b in zip(rows_alone, rows, strict=True):
        a.pop("steps_per_s"), b.pop("steps_per_s")
        assert a == b


def test_eval_reports_the_held_out_return(left_alone, capsys):
    cfg, _ = left_alone
    run.main(["--eval", cfg.out, "--episodes", "4", "--greedy"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "held-out-task return" in line and "4 episodes, greedy actions" in line


def test_sac_d_end_to_end():
    cfg = dataclasses.replace(
        sac.PRESETS["credit"],
        env="RepeatFirstEasy",
        memory="gru",
        memory_features=8,
        obs_embed=8,
        action_embed=4,
        hidden=16,
        batch_size=2,
        rollouts_per_iter=2,
        random_rollouts=2,
        num_iters=2,
        update_ratio=0.0,
        updates_per_iter=3,
        learn_alpha=True,
    )
    _, metrics = jax.jit(sac.make_train(cfg))(sac.make_keys(cfg))
    metrics = jax.device_get(metrics)
    for name in ("critic_loss", "actor_loss", "grad_norm", "entropy"):
        assert np.isfinite(metrics[name][1:]).all(), name
    # The target entropy is 0.98 log|A| (Christodoulou 2019); α moved from 0.1.
    assert sac.make_env_and_network(cfg).target_entropy == pytest.approx(0.98 * np.log(4))
    alpha = metrics["alpha"][1:, 0]  # the mean α of each training iteration's updates
    assert alpha[0] == pytest.approx(0.1, rel=1e-2) and alpha[1] != alpha[0]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--env", "Wnd-50-150"], ["unknown env id", "Wind-50-150"]),
        (["--preset", "meta-cartpole"], ["unknown --preset", "meta-wind"]),
        (["--preset", "credit", "--env", "Wind-50-150"], ["SAC-D", "Box", "meta-wind"]),
        (["--preset", "meta-wind", "--env", "VisualMatch-250"], ["Discrete", "credit"]),
        (["--env", "Wind-50-150", "--batch-size", "64", "--buffer-size", "1000"], ["one batch"]),
        (["--env", "Wind-50-150", "--buffer-size", "50"], ["no whole episode", "100 steps"]),
        (["--memory", "lstm"], ["unknown --memory", "gru"]),
        (["--actor-memory", "transformer"], ["unknown --actor-memory"]),
        (["--memory", "gru", "--memory-clamp", "100"], ["--memory-clamp is for SHM"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_compiling(flags, needles, tmp_path, capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run.main([*flags, "--out", str(tmp_path / "run")], algo="sac")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
    assert time.perf_counter() - t0 < 10  # nothing was compiled
    assert not os.path.exists(tmp_path / "run")


def test_command_line_entry(tmp_path):
    """`python sac.py` lands in run.main with this algorithm (bad input: exit 2, one line)."""
    result = subprocess.run(
        [sys.executable, "sac.py", "--preset", "credit", "--env", "Wind-10-190"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "SAC-D" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pendulum_is_learned():
    """gymnax Pendulum-v1 (memoryless): a random policy scores about -1200 per episode; SAC
    with a GRU passes -400 within 4,000 updates of 8 episodes."""
    cfg = dataclasses.replace(
        sac.Config(),
        memory="gru",
        rollouts_per_iter=4,
        random_rollouts=4,
        num_iters=40,
        updates_per_iter=100,
        batch_size=8,
    )
    _, metrics = jax.jit(sac.make_train(cfg))(sac.make_keys(cfg))
    returns = np.asarray(metrics["episode_return"])[:, 0]
    assert returns[:2].mean() < -900
    assert returns[-5:].mean() > -400, returns.round().tolist()
