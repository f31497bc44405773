"""Pendulums vs popgym 1.0.7: popgym's hidden (theta, theta_dot) injected, the same torques
played, equal observations, rewards, terminated and truncated at every step; noise and start
states by distribution."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from popgym.envs import noisy_position_only_pendulum as pg_noisy
from popgym.envs import position_only_pendulum as pg_pos
from scipy import stats

import envs
from envs.pendulum import EnvState, Pendulum

LEVELS = ("Easy", "Medium", "Hard")
NOISE_FREE = [f"PositionOnlyPendulum{lv}" for lv in LEVELS]
NOISY = [f"NoisyPositionOnlyPendulum{lv}" for lv in LEVELS]


def popgym_env(env_id: str):
    return getattr(pg_noisy if env_id.startswith("Noisy") else pg_pos, env_id)()


def to_state(s: np.ndarray, t) -> EnvState:
    """JAX state(s) from gymnasium's hidden (theta, theta_dot) [..., 2] at time t; theta is
    wrapped to [-pi, pi) in float64 first, as the env stores it (gymnasium lets it grow)."""
    s = np.array(s, np.float64)
    s[..., 0] = (s[..., 0] + np.pi) % (2 * np.pi) - np.pi
    s = jnp.asarray(s, jnp.float32)
    return EnvState(time=jnp.asarray(t, jnp.int32), theta=s[..., 0], theta_dot=s[..., 1])


@functools.cache
def compiled(env_id: str):
    """(env, params, forced, free): `forced` steps every recorded popgym state once (teacher
    forcing, [T] batch); `free` rolls the JAX env on its own from a start state."""
    env, params = envs.make(env_id)

    def one(key, state, action):
        obs, state, reward, term, _ = env.step_env(key, state, action, params)
        return obs, reward, term, env.is_truncated(state, params)

    forced = jax.jit(jax.vmap(one))

    @jax.jit
    def free(key, state, actions):
        def step(state, xs):
            k, a = xs
            obs, state, reward, term, _ = env.step_env(k, state, a, params)
            return state, (obs, reward, term, env.is_truncated(state, params))

        keys = jax.random.split(key, actions.shape[0])
        return jax.lax.scan(step, state, (keys, actions))[1]

    return env, params, forced, free


def play(pg_env, seed: int, rng: np.random.Generator):
    """One popgym episode of random torques in [-3, 3] (so clipping is exercised): start state,
    hidden states before each step [T, 2], actions [T, 1], obs [T, 2], rewards, terminated,
    truncated [T], clean next [cos, sin] [T, 2], reset obs."""
    obs0, _ = pg_env.reset(seed=seed)
    s0 = np.array(pg_env.unwrapped.state, np.float64)
    rec = []
    while True:
        s = np.array(pg_env.unwrapped.state, np.float64)
        a = rng.uniform(-3, 3, size=(1,)).astype(np.float32)
        o, r, te, tr, _ = pg_env.step(a)
        th = pg_env.unwrapped.state[0]
        rec.append((s, a, np.asarray(o, np.float32), r, te, tr, np.array([np.cos(th), np.sin(th)])))
        if te or tr:
            break
    cols = [np.asarray(c) for c in zip(*rec, strict=True)]
    return s0, obs0, cols


@pytest.mark.parametrize("env_id", NOISE_FREE)
def test_matches_popgym(env_id):
    env, params, forced, free = compiled(env_id)
    pg_env = popgym_env(env_id)
    assert env.observation_space(params).shape == pg_env.observation_space.shape
    assert env.action_space(params).shape == pg_env.action_space.shape == (1,)
    np.testing.assert_allclose(env.action_space(params).high, pg_env.action_space.high)
    rng = np.random.default_rng(0)
    for seed in range(3):
        s0, obs0, (states, actions, obs, rew, term, trunc, _) = play(pg_env, seed, rng)
        T = len(actions)
        assert T == params.max_steps_in_episode == pg_env.max_episode_length
        np.testing.assert_allclose(obs0, [np.cos(s0[0]), np.sin(s0[0])], atol=1e-6)
        # Teacher forcing: every recorded popgym state stepped once in JAX.
        j_obs, j_rew, j_term, j_trunc = forced(
            jax.random.split(jax.random.key(seed), T),
            to_state(states, np.arange(T)),
            jnp.asarray(actions),
        )
        np.testing.assert_allclose(j_obs, obs, atol=2e-6)
        np.testing.assert_allclose(j_rew, rew, rtol=1e-5, atol=1e-6 / T)
        np.testing.assert_array_equal(j_term, term)
        np.testing.assert_array_equal(j_trunc, trunc)
        assert np.abs(rew).max() <= 1 / T and rew.min() < 0 < rew.max()
        # Free-running: float32 tracks float64 until the chaotic upright passages amplify the
        # rounding (about 150 steps in), so compare the first 60 steps and the flags.
        f_obs, f_rew, f_term, f_trunc = free(jax.random.key(seed), to_state(s0, 0), actions)
        np.testing.assert_allclose(f_obs[:60], obs[:60], atol=1e-4)
        np.testing.assert_allclose(f_rew[:60], rew[:60], atol=1e-4 / T)
        np.testing.assert_array_equal(f_term, term)
        np.testing.assert_array_equal(f_trunc, trunc)


@pytest.mark.parametrize("env_id", NOISY)
def test_noisy_matches_popgym(env_id):
    env, params, forced, _ = compiled(env_id)
    pg_env = popgym_env(env_id)
    rng = np.random.default_rng(1)
    j_res, pg_res = [], []
    for seed in range(3):
        _, _, (states, actions, obs, rew, term, trunc, clean) = play(pg_env, seed, rng)
        T = len(actions)
        assert T == params.max_steps_in_episode == 200  # popgym keeps L = 200 when noisy
        keys = jax.random.split(jax.random.key(seed), T)
        j_obs, j_rew, j_term, j_trunc = forced(keys, to_state(states, np.arange(T)), actions)
        np.testing.assert_allclose(j_rew, rew, rtol=1e-5, atol=1e-6 / T)
        np.testing.assert_array_equal(j_term, term)
        np.testing.assert_array_equal(j_trunc, trunc)
        # The noise-free part: clip(popgym's clean [cos, sin] + this env's N(0, sigma) draw).
        noise = env.noise_sigma * jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys)
        np.testing.assert_allclose(j_obs, np.clip(clean + noise, -1, 1), atol=1e-5)
        j_res.append(np.asarray(j_obs) - clean)
        pg_res.append(obs - clean)
    j_res, pg_res = np.concatenate(j_res), np.concatenate(pg_res)
    for c in range(2):  # same clean states -> the clipped residuals must share a distribution
        assert stats.ks_2samp(j_res[:, c], pg_res[:, c]).pvalue > 1e-3
    # Noise strictly inside the box on both sides is rare for Hard; compare spreads instead.
    np.testing.assert_allclose(j_res.std(0), pg_res.std(0), rtol=0.15)


def test_reset_distribution():
    env, params, _, _ = compiled("PositionOnlyPendulumEasy")
    obs, state = jax.jit(jax.vmap(lambda k: env.reset_env(k, params)))(
        jax.random.split(jax.random.key(0), 2000)
    )
    th, thd = np.asarray(state.theta), np.asarray(state.theta_dot)
    assert np.abs(th).max() <= np.pi and np.abs(thd).max() <= 1
    np.testing.assert_allclose(obs, np.stack([np.cos(th), np.sin(th)], -1), atol=1e-6)
    pg_env = popgym_env("PositionOnlyPendulumEasy")
    pg_s = []
    for i in range(300):
        pg_env.reset(seed=i)
        pg_s.append(np.array(pg_env.unwrapped.state))
    pg_s = np.stack(pg_s)
    for x, pg_x, lo, width in ((th, pg_s[:, 0], -np.pi, 2 * np.pi), (thd, pg_s[:, 1], -1, 2)):
        assert stats.kstest(x, "uniform", args=(lo, width)).pvalue > 1e-3
        assert stats.ks_2samp(x, pg_x).pvalue > 1e-3


def test_jit_vmap_autoreset_determinism():
    env, params, _, _ = compiled("NoisyPositionOnlyPendulumHard")

    @jax.jit
    def run(key):
        obs, state = jax.vmap(env.reset, (0, None))(jax.random.split(key, 4), params)

        def step(state, k):
            ka, ks = jax.random.split(k)
            actions = jax.random.uniform(ka, (4, 1), minval=-2, maxval=2)
            obs, state, r, te, tr, _ = jax.vmap(env.step, (0, 0, 0, None))(
                jax.random.split(ks, 4), state, actions, params
            )
            return state, (obs, r, te, tr, state.time)

        return jax.lax.scan(step, state, jax.random.split(key, 450))[1]

    out = run(jax.random.key(3))
    again = run(jax.random.key(3))
    for x, y in zip(out, again, strict=True):
        np.testing.assert_array_equal(x, y)
    obs, reward, term, trunc, time = out
    assert not np.array_equal(obs, run(jax.random.key(4))[0])
    assert obs.shape == (450, 4, 2) and np.abs(obs).max() <= 1
    assert not term.any()
    # Truncated exactly at steps 200 and 400 of every env, then auto-reset to time 0.
    np.testing.assert_array_equal(np.nonzero(trunc[:, 0])[0], [199, 399])
    assert np.all(time[trunc] == 0) and np.abs(reward).max() <= 1 / 200


def test_registry_and_errors():
    a, b = envs.make("NoisyStatelessPendulumHard")[0], envs.make("NoisyPositionOnlyPendulumHard")[0]
    assert (a.noise_sigma, a.episode_length) == (b.noise_sigma, b.episode_length) == (0.3, 200)
    assert envs.make("StatelessPendulumMedium")[1].max_steps_in_episode == 150
    with pytest.raises(ValueError, match="episode_length"):
        Pendulum(episode_length=-3)
    with pytest.raises(ValueError, match="noise_sigma"):
        Pendulum(noise_sigma=-0.1)
