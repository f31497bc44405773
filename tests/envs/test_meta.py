"""Wind and Point Robot vs the spec's equations (a float64 numpy loop), their task pools and
draws, and the episode / trial boundaries of the meta-RL wrapper."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import envs
from envs.meta import PointRobot, Wind

IDS = ["Wind-10-190", "Wind-50-150", "PointRobot-10-190", "PointRobot-50-150"]
H = 100  # steps per inner episode


@functools.cache
def compiled(env_id: str):
    """(env, params, trial): `trial(key, params, actions [T, 2])` resets, then steps T times
    with step_env (no auto-reset), returning obs0, state0 and per-step outputs."""
    env, params = envs.make(env_id)

    @jax.jit
    def trial(key, params, actions):
        key_reset, key_steps = jax.random.split(key)
        obs0, state0 = env.reset_env(key_reset, params)

        def step(state, xs):
            k, a = xs
            obs, state, reward, term, info = env.step_env(k, state, a, params)
            out = (obs, reward, term, env.is_truncated(state, params), info, state.pos)
            return state, out

        keys = jax.random.split(key_steps, actions.shape[0])
        return obs0, state0, jax.lax.scan(step, state0, (keys, actions))[1]

    return env, params, trial


def reference(kind: str, task, starts, actions, episodes: int):
    """The spec's equations in float64: positions, sparse rewards, flags, distances to goal."""
    wind = kind == "Wind"
    goal = np.array([0.0, 1.0]) if wind else np.asarray(task, np.float64)
    radius = 0.01 if wind else 0.05
    pos = np.asarray(starts[0], np.float64)
    obs, rewards, dists = [], [], []
    for t, a in enumerate(np.asarray(actions, np.float64)):
        pos = pos + 0.1 * np.clip(a, -1, 1) + (np.asarray(task, np.float64) if wind else 0.0)
        d = np.linalg.norm(pos - goal)
        ended = (t + 1) % H == 0
        obs.append(np.append(pos, float(ended)) if episodes > 1 else pos.copy())
        rewards.append(float(d <= radius))
        dists.append(d)
        if ended and t + 1 < len(actions):
            pos = np.asarray(starts[(t + 1) // H], np.float64)
    return np.array(obs), np.array(rewards), np.array(dists)


def steering_actions(kind, task, starts, episodes, rng):
    """Closed-loop float64 actions that head for the goal with noise (some outside [-1, 1] to
    exercise the clip): many steps hit the goal, many miss."""
    wind = np.asarray(task, np.float64) if kind == "Wind" else np.zeros(2)
    goal = np.array([0.0, 1.0]) if kind == "Wind" else np.asarray(task, np.float64)
    noise = 5 * (0.01 if kind == "Wind" else 0.05)  # half a goal radius per step, after x0.1
    actions = []
    for e in range(episodes):
        pos = np.asarray(starts[e], np.float64)
        for _ in range(H):
            a = np.clip((goal - pos - wind) / 0.1, -1, 1) + rng.normal(0, noise, 2)
            if rng.random() < 0.15:
                a = rng.uniform(-1.6, 1.6, 2)
            actions.append(a)
            pos = pos + 0.1 * np.clip(a, -1, 1) + wind
    return np.array(actions, np.float32)


@pytest.mark.parametrize("env_id", IDS)
def test_dynamics_match_numpy(env_id):
    env, params, trial = compiled(env_id)
    kind = env_id.split("-")[0]
    K = env.episodes_per_task
    assert K == (1 if kind == "Wind" else 2) and params.max_steps_in_episode == K * H
    rng = np.random.default_rng(0)
    hits = 0
    for seed in range(3):
        key = jax.random.key(seed)
        # Pass 1: the task and the start of every inner episode (they don't depend on actions).
        obs0, state0, out = trial(key, params, jnp.zeros((K * H, 2)))
        starts = [np.asarray(state0.pos)] + [np.asarray(out[5][e * H - 1]) for e in range(1, K)]
        task = np.asarray(state0.task)
        actions = steering_actions(kind, task, starts, K, rng)
        # Pass 2: the same key with goal-seeking actions, against the float64 loop.
        obs0, state0, (obs, rew, term, trunc, info, pos) = trial(key, params, actions)
        ref_obs, ref_rew, dist = reference(kind, task, starts, actions, K)
        np.testing.assert_allclose(obs, ref_obs, atol=2e-5)
        np.testing.assert_array_equal(obs0[:2], starts[0])
        if kind == "Wind":
            np.testing.assert_array_equal(starts[0], [0, 0])
        radius = env.goal_radius
        clear = np.abs(dist - radius) > 1e-5  # float32 vs float64 can disagree on the rim only
        assert clear.mean() > 0.97
        np.testing.assert_array_equal(np.asarray(rew)[clear], ref_rew[clear])
        assert not np.asarray(term).any()
        np.testing.assert_array_equal(np.nonzero(trunc)[0], [K * H - 1])
        # The per-inner-episode returns reported at the trial's last step.
        for e in range(K):
            assert info[f"return_ep{e}"][-1] == rew[e * H : (e + 1) * H].sum()
        hits += int(np.sum(rew))
    assert 20 < hits < 3 * K * H - 50  # many hits and many misses


def test_trial_boundaries_point_robot():
    env, params, trial = compiled("PointRobot-10-190")
    actions = jax.random.uniform(jax.random.key(9), (2 * H, 2), minval=-1.2, maxval=1.2)
    obs0, state0, (obs, rew, term, trunc, info, pos) = trial(jax.random.key(5), params, actions)
    obs, pos, actions = np.asarray(obs), np.asarray(pos), np.asarray(actions)
    assert obs.shape == (2 * H, 3) and obs0.shape == (3,) and obs0[2] == 0
    # The flag is 1.0 exactly on the step that ends each inner episode.
    np.testing.assert_array_equal(np.nonzero(obs[:, 2])[0], [H - 1, 2 * H - 1])
    assert set(np.unique(obs[:, 2])) == {0.0, 1.0}
    # The trial goes on across the inner boundary; done only at its end.
    np.testing.assert_array_equal(np.nonzero(trunc)[0], [2 * H - 1])
    # Step H-1 shows episode 0's last position; the state then holds a fresh start ...
    start1 = pos[H - 1]
    np.testing.assert_allclose(
        obs[H - 1, :2], pos[H - 2] + 0.1 * np.clip(actions[H - 1], -1, 1), atol=1e-6
    )
    assert np.linalg.norm(start1 - obs[H - 1, :2]) > 1e-3
    assert -1.5 <= start1[0] <= 1.5 and -0.5 <= start1[1] <= 1.5
    # ... first seen after episode 1's first move.
    np.testing.assert_allclose(obs[H, :2], start1 + 0.1 * np.clip(actions[H], -1, 1), atol=1e-6)
    # Per-episode returns accumulate separately.
    np.testing.assert_array_equal(info["return_ep1"][:H], 0)


def test_auto_reset_trials_and_wind_obs():
    """Through gymnax's `step`: done exactly at trial ends, new task and returns per trial."""
    for env_id, K in (("PointRobot-50-150", 2), ("Wind-10-190", 1)):
        env, params = envs.make(env_id)

        @jax.jit
        def run(key, env=env, params=params):
            obs, state = env.reset(key, params)

            def step(state, k):
                ka, ks = jax.random.split(k)
                a = jax.random.uniform(ka, (2,), minval=-1, maxval=1)
                obs, state, r, te, tr, info = env.step(ks, state, a, params)
                return state, (obs, te | tr, state.task_index, state.episode_returns.sum())

            return jax.lax.scan(step, state, jax.random.split(key, 6 * H))[1]

        obs, done, index, ret = run(jax.random.key(0))
        assert obs.shape == (6 * H, 2 + (K > 1))
        ends = np.arange(K * H - 1, 6 * H, K * H)
        np.testing.assert_array_equal(np.nonzero(done)[0], ends)
        np.testing.assert_array_equal(ret[done], 0)  # fresh trial state after the auto-reset
        assert np.all(index < env.num_train_tasks)
        trial_tasks = index[ends]
        assert len(set(trial_tasks.tolist())) > 1  # tasks are redrawn per trial
        for a, b in zip(run(jax.random.key(0)), (obs, done, index, ret), strict=True):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(run(jax.random.key(1))[0], obs)


def test_task_pools():
    wind, pr = Wind(num_train_tasks=10).pool, PointRobot(num_train_tasks=10).pool
    assert wind.shape == pr.shape == (200, 2) and wind.dtype == np.float32
    # Reproducible from the seed, different for another seed.
    np.testing.assert_array_equal(wind, Wind(num_train_tasks=50).pool)
    assert not np.array_equal(wind, Wind(num_train_tasks=10, seed=1).pool)
    # Winds ~ U[-0.1, 0.1]^2; goals on the upper unit half-circle, angle ~ U[0, pi].
    assert np.abs(wind).max() <= 0.1
    for c in range(2):
        assert stats.kstest(wind[:, c], "uniform", args=(-0.1, 0.2)).pvalue > 1e-3
    np.testing.assert_allclose(np.linalg.norm(pr, axis=1), 1, atol=1e-6)
    angles = np.arctan2(pr[:, 1], pr[:, 0])
    assert angles.min() >= 0 and angles.max() <= np.pi
    assert stats.kstest(angles, "uniform", args=(0, np.pi)).pvalue > 1e-3
    # Train and eval tasks are disjoint (no task repeats in the pool).
    for pool in (wind, pr):
        assert len(np.unique(pool, axis=0)) == 200


def test_pools_replay_the_original_draws():
    """The original's call sequence on numpy's global generator (scalar draws, seeded 1337 in
    the env constructors, split by the learner's np.random.permutation): its training tasks
    are our pool's first N rows."""
    saved = np.random.get_state()
    try:
        np.random.seed(1337)
        winds = np.array(
            [[np.random.uniform(-0.1, 0.1), np.random.uniform(-0.1, 0.1)] for _ in range(200)]
        )
        wind_split = np.random.permutation(range(200))
        np.random.seed(1337)
        [[np.random.uniform(-10.0, 10.0), np.random.uniform(-10.0, 10.0)] for _ in range(200)]
        [np.random.uniform(-1.5, 1.5), np.random.uniform(-0.5, 1.5)]  # reset_task(0)
        angles = np.random.uniform(0, np.pi, size=200)
        goals = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        np.random.shuffle(goals)
        [np.random.uniform(-1.5, 1.5), np.random.uniform(-0.5, 1.5)]  # reset_task(0) again
        pr_split = np.random.permutation(range(200))
    finally:
        np.random.set_state(saved)
    for n in (10, 50):
        w = Wind(num_train_tasks=n)
        np.testing.assert_allclose(w.pool[:n], winds[wind_split[:n]], rtol=1e-6)
        np.testing.assert_allclose(w.pool[n:], winds[wind_split[-(200 - n) :]], rtol=1e-6)
        p = PointRobot(num_train_tasks=n)
        np.testing.assert_allclose(p.pool[:n], goals[pr_split[:n]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("env_id", ["PointRobot-10-190", "Wind-50-150"])
def test_task_draws_train_and_eval(env_id):
    env, params = envs.make(env_id)
    eval_params = env.eval_params(params)
    assert jax.tree.structure(eval_params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(eval_params), strict=True):
        assert np.shape(a) == np.shape(b)
    reset = jax.jit(jax.vmap(env.reset_env, (0, None)))
    keys = jax.random.split(jax.random.key(0), 4000)
    N = env.num_train_tasks
    for p, lo, hi in ((params, 0, N), (eval_params, N, 200)):
        obs, state = reset(keys, p)
        index = np.asarray(state.task_index)
        assert index.min() == lo and index.max() == hi - 1  # only this split's tasks
        counts = np.bincount(index - lo, minlength=hi - lo)
        assert counts.min() > 0 and stats.chisquare(counts).pvalue > 1e-3
        np.testing.assert_array_equal(state.task, env.pool[index])
    start = np.asarray(reset(keys, params)[1].pos)
    if env_id.startswith("Wind"):
        np.testing.assert_array_equal(start, 0)
    else:  # U([-1.5, 1.5] x [-0.5, 1.5])
        assert stats.kstest(start[:, 0], "uniform", args=(-1.5, 3)).pvalue > 1e-3
        assert stats.kstest(start[:, 1], "uniform", args=(-0.5, 2)).pvalue > 1e-3


def test_spaces_metrics_and_errors():
    wind, pr = envs.make("Wind-10-190")[0], envs.make("PointRobot-50-150")[0]
    assert wind.observation_space().shape == (2,) and pr.observation_space().shape == (3,)
    assert wind.action_space().shape == pr.action_space().shape == (2,)
    np.testing.assert_array_equal(np.broadcast_to(pr.action_space().low, 2), -1)
    np.testing.assert_array_equal(np.broadcast_to(pr.action_space().high, 2), 1)
    assert wind.episode_metrics == ("return_ep0",)
    assert pr.episode_metrics == ("return_ep0", "return_ep1")
    assert (pr.num_train_tasks, pr.num_tasks) == (50, 200)
    with pytest.raises(ValueError, match="num_train_tasks"):
        Wind(num_train_tasks=200)
    with pytest.raises(ValueError, match="num_train_tasks"):
        PointRobot(num_train_tasks=0)
    with pytest.raises(ValueError, match="episodes_per_task"):
        PointRobot(episodes_per_task=0)
