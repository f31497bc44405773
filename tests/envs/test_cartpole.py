"""CartPoles vs popgym 1.0.7: popgym's hidden cart state injected, the same actions played,
equal observations, rewards, terminated and truncated at every step; noise and start states
by distribution."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from popgym.envs import noisy_position_only_cartpole as pg_noisy
from popgym.envs import position_only_cartpole as pg_pos
from popgym.envs import velocity_only_cartpole as pg_vel
from scipy import stats

import envs
from envs.cartpole import CartPole, EnvState

LEVELS = ("Easy", "Medium", "Hard")
NOISE_FREE = [f"PositionOnlyCartPole{lv}" for lv in LEVELS] + [
    f"VelocityOnlyCartPole{lv}" for lv in LEVELS
]
NOISY = [f"NoisyPositionOnlyCartPole{lv}" for lv in LEVELS]


def popgym_env(env_id: str):
    module = pg_noisy if env_id.startswith("Noisy") else pg_vel if "Velocity" in env_id else pg_pos
    return getattr(module, env_id)()


def to_state(s: np.ndarray, t) -> EnvState:
    """JAX state(s) from gymnasium's hidden (x, x_dot, theta, theta_dot) [..., 4] at time t."""
    s = jnp.asarray(s, jnp.float32)
    return EnvState(
        time=jnp.asarray(t, jnp.int32),
        x=s[..., 0],
        x_dot=s[..., 1],
        theta=s[..., 2],
        theta_dot=s[..., 3],
    )


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


def play(pg_env, seed: int, rng: np.random.Generator, controller: bool):
    """One popgym episode: start state, hidden states before each step [T, 4], actions [T],
    obs [T, 2], rewards, terminated, truncated [T], clean next positions [T, 2], reset obs."""
    obs0, _ = pg_env.reset(seed=seed)
    s0 = np.array(pg_env.unwrapped.state, np.float64)
    rec = []
    while True:
        s = np.array(pg_env.unwrapped.state, np.float64)
        x, xd, th, thd = s
        if controller and rng.random() > 0.2:  # balances for hundreds of steps
            a = int(th + 0.5 * thd + 0.05 * x + 0.2 * xd > 0)
        else:
            a = int(rng.integers(2))
        o, r, te, tr, _ = pg_env.step(a)
        s1 = pg_env.unwrapped.state
        rec.append((s, a, np.asarray(o, np.float32), r, te, tr, np.array([s1[0], s1[2]])))
        if te or tr:
            break
    cols = [np.asarray(c) for c in zip(*rec, strict=True)]
    return s0, obs0, cols


@pytest.mark.parametrize("env_id", NOISE_FREE)
def test_matches_popgym(env_id):
    env, params, forced, free = compiled(env_id)
    pg_env = popgym_env(env_id)
    assert env.observation_space(params).shape == pg_env.observation_space.shape
    np.testing.assert_allclose(env.observation_space(params).high, pg_env.observation_space.high)
    assert env.num_actions == pg_env.action_space.n
    rng = np.random.default_rng(0)
    lengths = []
    for seed in range(4):
        controller = seed % 2 == 0
        s0, obs0, (states, actions, obs, rew, term, trunc, _) = play(pg_env, seed, rng, controller)
        T = len(actions)
        lengths.append(T)
        # popgym's reset obs is [x, theta] for every variant (VelocityOnly's reset quirk).
        np.testing.assert_allclose(obs0, [s0[0], s0[2]], rtol=1e-6)
        # Teacher forcing: every recorded popgym state stepped once in JAX.
        j_obs, j_rew, j_term, j_trunc = forced(
            jax.random.split(jax.random.key(seed), T),
            to_state(states, np.arange(T)),
            jnp.asarray(actions, jnp.int32),
        )
        np.testing.assert_allclose(j_obs, obs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(j_rew, rew, rtol=1e-6)
        np.testing.assert_array_equal(j_term, term)
        np.testing.assert_array_equal(j_trunc, trunc)
        if not controller:  # short random episodes: free-running float32 stays close
            f_obs, f_rew, f_term, f_trunc = free(
                jax.random.key(seed), to_state(s0, 0), jnp.asarray(actions, jnp.int32)
            )
            np.testing.assert_allclose(f_obs, obs, atol=1e-4)
            np.testing.assert_array_equal(f_term, term)
            np.testing.assert_array_equal(f_trunc, trunc)
    # Controller episodes reach popgym's truncation step L with reward 1/L throughout.
    assert lengths[0] == lengths[2] == params.max_steps_in_episode == env.episode_length
    assert lengths[1] < params.max_steps_in_episode  # random play falls


@pytest.mark.parametrize("env_id", NOISY)
def test_noisy_matches_popgym(env_id):
    env, params, forced, _ = compiled(env_id)
    pg_env = popgym_env(env_id)
    assert params.max_steps_in_episode == 200  # popgym keeps L = 200 at every noise level
    high = np.asarray(pg_env.observation_space.high)
    np.testing.assert_allclose(env.observation_space(params).high, high)
    rng = np.random.default_rng(1)
    j_res, pg_res = [], []
    for seed in range(3):
        _, _, (states, actions, obs, rew, term, trunc, clean) = play(pg_env, seed, rng, True)
        T = len(actions)
        keys = jax.random.split(jax.random.key(seed), T)
        j_obs, j_rew, j_term, j_trunc = forced(
            keys, to_state(states, np.arange(T)), jnp.asarray(actions, jnp.int32)
        )
        np.testing.assert_allclose(j_rew, rew, rtol=1e-6)
        np.testing.assert_array_equal(j_term, term)
        np.testing.assert_array_equal(j_trunc, trunc)
        # The noise-free part: clip(popgym's clean position + this env's N(0, sigma) draw).
        noise = env.noise_sigma * jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys)
        np.testing.assert_allclose(j_obs, np.clip(clean + noise, -high, high), atol=1e-5)
        j_res.append(np.asarray(j_obs) - clean)
        pg_res.append(obs - clean)
    j_res, pg_res = np.concatenate(j_res), np.concatenate(pg_res)
    for c in range(2):  # same clean states -> the clipped residuals must share a distribution
        assert stats.ks_2samp(j_res[:, c], pg_res[:, c]).pvalue > 1e-3
    # x is never clipped here: its residual is N(0, sigma) in both.
    for res in (j_res[:, 0], pg_res[:, 0]):
        assert abs(res.std() / env.noise_sigma - 1) < 0.1
        assert stats.kstest(res / env.noise_sigma, "norm").pvalue > 1e-3


def test_noisy_noise_level_is_detected():
    """The residual test above can fail: sigma 0.1 and 0.2 residuals differ."""
    rng = np.random.default_rng(0)
    a, b = 0.1 * rng.standard_normal(600), 0.2 * rng.standard_normal(600)
    assert stats.ks_2samp(a, b).pvalue < 1e-3


def test_reset_distribution():
    env, params, _, _ = compiled("VelocityOnlyCartPoleEasy")
    obs, state = jax.jit(jax.vmap(lambda k: env.reset_env(k, params)))(
        jax.random.split(jax.random.key(0), 2000)
    )
    s = np.stack([state.x, state.x_dot, state.theta, state.theta_dot], -1)
    assert s.dtype == np.float32 and np.abs(s).max() <= 0.05
    np.testing.assert_array_equal(obs, s[:, [0, 2]])
    assert np.all(state.time == 0)
    pg_env = popgym_env("VelocityOnlyCartPoleEasy")
    pg_s = []
    for i in range(300):
        pg_env.reset(seed=i)
        pg_s.append(np.array(pg_env.unwrapped.state))
    pg_s = np.stack(pg_s)
    for c in range(4):
        assert stats.kstest(s[:, c], "uniform", args=(-0.05, 0.1)).pvalue > 1e-3
        assert stats.ks_2samp(s[:, c], pg_s[:, c]).pvalue > 1e-3


def test_jit_vmap_autoreset_determinism():
    env, params, _, _ = compiled("NoisyPositionOnlyCartPoleEasy")

    @jax.jit
    def run(key):
        keys = jax.random.split(key, 8)
        obs, state = jax.vmap(env.reset, (0, None))(keys, params)

        def step(carry, k):
            state = carry
            ka, ks = jax.random.split(k)
            actions = jax.random.randint(ka, (8,), 0, 2)
            obs, state, r, te, tr, _ = jax.vmap(env.step, (0, 0, 0, None))(
                jax.random.split(ks, 8), state, actions, params
            )
            return state, (obs, r, te | tr, state.time)

        return jax.lax.scan(step, state, jax.random.split(key, 300))[1]

    obs, reward, done, time = run(jax.random.key(3))
    again = run(jax.random.key(3))
    other = run(jax.random.key(4))
    for x, y in zip((obs, reward, done, time), again, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(obs, other[0])
    assert obs.shape == (300, 8, 2) and obs.dtype == np.float32
    np.testing.assert_allclose(reward, 1 / 200)
    assert done.sum() > 20  # random play falls within ~10-40 steps and resets
    assert np.all(time[done] == 0) and np.all(time[~done] > 0)


def test_registry_and_errors():
    for alias, name in [
        ("StatelessCartPoleHard", "PositionOnlyCartPoleHard"),
        ("NoisyStatelessCartPoleMedium", "NoisyPositionOnlyCartPoleMedium"),
    ]:
        a, b = envs.make(alias)[0], envs.make(name)[0]
        assert (a.observe, a.noise_sigma, a.episode_length) == (
            b.observe,
            b.noise_sigma,
            b.episode_length,
        )
    with pytest.raises(ValueError, match="observe"):
        CartPole(observe="angle")
    with pytest.raises(ValueError, match="episode_length"):
        CartPole(episode_length=0)
    with pytest.raises(ValueError, match="noise_sigma"):
        CartPole(noise_sigma=-1.0)
