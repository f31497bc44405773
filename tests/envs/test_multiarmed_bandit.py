"""MultiarmedBandit vs popgym 1.0.7: same odds + same pulls -> same obs, rewards, flags (odds
of 0 or 1, where payouts are deterministic); payouts follow the drawn odds otherwise."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from popgym.envs import multiarmed_bandit as pg

import envs
from envs.multiarmed_bandit import MultiarmedBandit

LEVELS = ["MultiarmedBanditEasy", "MultiarmedBanditMedium", "MultiarmedBanditHard"]


@functools.cache
def compiled(env_id: str):
    """(env, params, jitted rollout(key, odds [K], actions [T]) -> obs0, (obs, rew, term, trunc))."""
    env, params = envs.make(env_id)

    @jax.jit
    def rollout(key, odds, actions):
        obs0, state = env.reset_from_odds(odds)

        def step(state, xs):
            k, a = xs
            obs, state, reward, term, _ = env.step_env(k, state, a, params)
            return state, (obs, reward, term, env.is_truncated(state, params))

        keys = jax.random.split(key, actions.shape[0])
        return obs0, jax.lax.scan(step, state, (keys, actions))[1]

    return env, params, rollout


@pytest.mark.parametrize("env_id", LEVELS)
def test_matches_popgym(env_id):
    env, params, rollout = compiled(env_id)
    pg_env = getattr(pg, env_id)()
    assert env.obs_requires_prev_action == pg_env.obs_requires_prev_action
    assert env.num_actions == pg_env.action_space.n
    assert env.observation_space(params).shape == (pg_env.observation_space.n,)
    rng = np.random.default_rng(0)
    for seed in range(4):
        pg_obs0, info = pg_env.reset(seed=seed)
        assert pg_env.bandits.dtype == np.float32
        # Odds of 0 or 1 make popgym's payouts deterministic; the rest of the rules are shared.
        odds = (pg_env.bandits > 0.5).astype(np.float32)
        pg_env.bandits = odds.copy()
        records = []
        done = False
        while not done:
            a = int(rng.integers(env.num_bandits))
            o, r, te, tr, _ = pg_env.step(a)
            records.append((a, np.eye(2, dtype=np.float32)[o], r, te, tr))
            done = te or tr
        actions, obs, rewards, terms, truncs = (np.asarray(x) for x in zip(*records, strict=True))
        assert len(actions) == params.max_steps_in_episode
        obs0, (j_obs, j_rew, j_term, j_trunc) = rollout(
            jax.random.key(seed), jnp.asarray(odds), jnp.asarray(actions, jnp.int32)
        )
        np.testing.assert_array_equal(obs0, np.eye(2)[pg_obs0])
        np.testing.assert_array_equal(j_obs, obs)
        np.testing.assert_allclose(j_rew, rewards, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(j_term, terms)
        np.testing.assert_array_equal(j_trunc, truncs)
        assert 0 < obs[:, 1].mean() < 1


def test_odds_uniform_and_payouts_follow_odds():
    env, params, rollout = compiled("MultiarmedBanditHard")
    odds = np.asarray(
        jax.jit(jax.vmap(lambda k: env.reset_env(k, params)[1].odds))(
            jax.random.split(jax.random.key(1), 2000)
        )
    ).reshape(-1)
    assert odds.dtype == np.float32 and odds.min() >= 0 and odds.max() < 1
    # Kolmogorov-Smirnov against U[0, 1): sup |F_n - F| < 1.95 / sqrt(n) at the 0.1% level.
    xs = np.sort(odds)
    ecdf = np.arange(1, len(xs) + 1) / len(xs)
    assert np.abs(ecdf - xs).max() < 1.95 / np.sqrt(len(xs))
    # Each arm pays with its own probability: z-test per arm over 600 * 8 pulls.
    fixed = np.linspace(0.02, 0.98, env.num_bandits).astype(np.float32)
    actions = np.tile(np.arange(env.num_bandits), 20).astype(np.int32)  # 600 pulls
    run = jax.vmap(lambda k: rollout(k, jnp.asarray(fixed), jnp.asarray(actions))[1][0])
    obs = np.asarray(run(jax.random.split(jax.random.key(2), 8)))  # [8, 600, 2]
    paid = obs[..., 1].reshape(8, 20, env.num_bandits).mean(axis=(0, 1))  # [K]
    z = (paid - fixed) / np.sqrt(fixed * (1 - fixed) / 160)
    assert np.abs(z).max() < 4.5, z
    assert ((z**2).sum() - env.num_bandits) < 5 * np.sqrt(2 * env.num_bandits)


@pytest.mark.parametrize("env_id", LEVELS)
def test_oracle_and_random_returns(env_id):
    """The best-arm oracle earns 2 max(odds) - 1 in expectation; returns stay in [-1, 1]."""
    env, params, _ = compiled(env_id)

    @jax.jit
    def episodes(keys):
        def one(key):
            k_reset, k_act = jax.random.split(key)
            _, state = env.reset_env(k_reset, params)

            def step(carry, k):
                s_or, s_rnd = carry
                k1, k2, k3 = jax.random.split(k, 3)
                _, s_or, r_or, te_or, _ = env.step_env(k1, s_or, jnp.argmax(s_or.odds), params)
                a = jax.random.randint(k2, (), 0, env.num_bandits)
                _, s_rnd, r_rnd, te_rnd, _ = env.step_env(k3, s_rnd, a, params)
                trunc = env.is_truncated(s_rnd, params)
                return (s_or, s_rnd), (r_or, r_rnd, te_or | te_rnd, trunc)

            keys = jax.random.split(k_act, params.max_steps_in_episode)
            _, (r_or, r_rnd, term, trunc) = jax.lax.scan(step, (state, state), keys)
            return r_or.sum(), r_rnd.sum(), 2 * state.odds.max() - 1, term.any(), trunc

        return jax.vmap(one)(keys)

    ret_or, ret_rnd, best, term, trunc = episodes(jax.random.split(jax.random.key(1), 64))
    trunc = np.asarray(trunc)
    assert not np.asarray(term).any()
    assert trunc[:, -1].all() and not trunc[:, :-1].any()  # truncated exactly at step L
    L = params.max_steps_in_episode
    # Per episode the oracle's return is (2 Binomial(L, p*) - L) / L: sd <= 1 / sqrt(L).
    diff = np.asarray(ret_or) - np.asarray(best)
    assert abs(diff.mean()) < 4 / np.sqrt(L * len(diff))
    assert np.all(np.abs(ret_rnd) <= 1.0 + 1e-5) and np.asarray(ret_or).mean() > 0.8


def test_jit_vmap_and_same_key_same_episode():
    env, params = envs.make("MultiarmedBanditEasy")

    def episode(key):
        k_reset, k_act = jax.random.split(key)
        _, state = env.reset(k_reset, params)
        actions = jax.random.randint(k_act, (50,), 0, env.num_actions)

        def step(state, xs):
            k, a = xs
            obs, state, r, te, tr, _ = env.step(k, state, a, params)
            return state, (obs, r)

        return jax.lax.scan(step, state, (jax.random.split(key, 50), actions))[1]

    run = jax.jit(jax.vmap(episode))
    keys = jax.random.split(jax.random.key(3), 4)
    a, b = run(keys), run(keys)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (4, 50, 2) and a[0].dtype == jnp.float32
    assert not np.array_equal(a[0][0], a[0][1])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_bandits"):
        MultiarmedBandit(num_bandits=0)
    with pytest.raises(ValueError, match="episode_length"):
        MultiarmedBandit(episode_length=-1)
