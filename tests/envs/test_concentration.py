"""Concentration vs popgym 1.0.7: same deck + same actions -> same obs, rewards, flags."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from popgym.envs import concentration as pg

import envs
from envs.concentration import Concentration, card_types

LEVELS = ["ConcentrationEasy", "ConcentrationMedium", "ConcentrationHard"]
NUM_SEEDS = 12


def one_hot_popgym(space, obs) -> np.ndarray:
    """popgym's MultiDiscrete obs -> concatenated one-hot float32 vector."""
    obs = np.asarray(obs).reshape(-1)
    nvec = np.asarray(space.nvec).reshape(-1)
    return np.concatenate([np.eye(n, dtype=np.float32)[o] for o, n in zip(obs, nvec, strict=True)])


@functools.cache
def compiled(env_id: str):
    """(env, params, jitted rollout(deck [N], actions [T]) -> obs, reward, term, trunc)."""
    env, params = envs.make(env_id)

    @jax.jit
    def rollout(deck, actions):
        obs0, state = env.reset_from_deck(deck)

        def step(state, a):
            obs, state, reward, term, _ = env.step_env(jax.random.key(0), state, a, params)
            return state, (obs, reward, term, env.is_truncated(state, params))

        _, out = jax.lax.scan(step, state, actions)
        return obs0, out

    return env, params, rollout


def corner_cases(types: np.ndarray) -> list[int]:
    """Flips that hit every rule: same card twice, a match, a face-up card as the first and
    as the second flip of a turn, a mismatch."""
    idx = np.arange(len(types))
    x = 0
    m = int(np.flatnonzero((types == types[x]) & (idx != x))[0])  # x's match
    y = int(np.flatnonzero((idx != x) & (idx != m))[0])
    z = int(np.flatnonzero((types != types[y]) & (idx != x) & (idx != m))[0])  # y's mismatch
    return [x, x, x, m, x, y, x, y, z]


def play_popgym(pg_env, rng: np.random.Generator, skill: float, script=()):
    """Play one popgym episode: the flips in `script`, then with prob `skill` a flip that uses
    the hidden deck (a face-down card first, its match second), else a uniform position.
    Returns the per-step records."""
    n = pg_env.deck.num_cards
    actions, obs, rewards, terms, truncs = [], [], [], [], []
    done = False
    script = list(script)
    while not done:
        face_up = set(pg_env.deck["face_up_idx"])
        in_play = list(pg_env.deck["in_play_idx"])
        a = int(rng.integers(n))
        if script:
            a = script.pop(0)
        elif rng.random() < skill:
            down = [i for i in range(n) if i not in face_up and i not in in_play]
            if in_play:
                want = pg_env.state[in_play[0]]
                matches = [i for i in down if pg_env.state[i] == want]
                a = matches[0] if matches else a
            elif down:
                a = int(rng.choice(down))
        o, r, te, tr, _ = pg_env.step(a)
        actions.append(a)
        obs.append(one_hot_popgym(pg_env.observation_space, o))
        rewards.append(r)
        terms.append(te)
        truncs.append(tr)
        done = te or tr
    return [np.asarray(x) for x in (actions, obs, rewards, terms, truncs)]


@pytest.mark.parametrize("env_id", LEVELS)
def test_matches_popgym(env_id):
    env, params, rollout = compiled(env_id)
    pg_env = getattr(pg, env_id)()
    assert env.observation_space(params).shape == (
        sum(one_hot_popgym(pg_env.observation_space, np.zeros(env.num_cards, int)).shape),
    )
    assert env.obs_requires_prev_action == pg_env.obs_requires_prev_action
    assert env.num_actions == pg_env.action_space.n
    assert params.max_steps_in_episode == pg_env.episode_length
    np.testing.assert_array_equal(card_types(env.num_decks, env.deck_type), pg_env.deck_idx_type)
    rng = np.random.default_rng(0)
    lengths, outcomes = [], set()
    for seed in range(NUM_SEEDS):
        pg_obs0, _ = pg_env.reset(seed=seed)
        deck = pg_env.deck.idx.copy()
        skill = [0, 0.6, 1][seed % 3]
        script = corner_cases(pg_env.state) if seed % 3 == 1 else ()
        actions, obs, rewards, terms, truncs = play_popgym(pg_env, rng, skill, script)
        if script:  # popgym scored the corner cases as the module docstring says
            expect = np.array([0, -2, 0, 0, -1, 0, -2, 0, -2]) / pg_env.episode_length
            expect[3] = pg_env.success_reward_scale
            np.testing.assert_allclose(rewards[: len(script)], expect)
        T = len(actions)
        padded = np.zeros(params.max_steps_in_episode, np.int32)
        padded[:T] = actions
        obs0, (j_obs, j_rew, j_term, j_trunc) = rollout(jnp.asarray(deck), jnp.asarray(padded))
        np.testing.assert_array_equal(obs0, one_hot_popgym(pg_env.observation_space, pg_obs0))
        np.testing.assert_array_equal(np.asarray(j_obs)[:T], obs)
        np.testing.assert_allclose(np.asarray(j_rew)[:T], rewards, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(j_term)[:T], terms)
        np.testing.assert_array_equal(np.asarray(j_trunc)[:T], truncs)
        lengths.append(T)
        outcomes.add((bool(terms[-1]), bool(truncs[-1])))
        outcomes.update(np.round(rewards * pg_env.episode_length, 3).tolist())
    # The episodes exercised both endings and every reward case.
    assert (True, False) in outcomes and (False, True) in outcomes
    assert {0.0, -1.0, -2.0} <= outcomes
    assert max(lengths) == params.max_steps_in_episode


@pytest.mark.parametrize("env_id", LEVELS)
def test_oracle_reaches_one_and_random_stays_in_bounds(env_id):
    env, params, _ = compiled(env_id)
    n = env.num_cards

    @jax.jit
    def episodes(keys):
        def one(key):
            k_reset, k_act = jax.random.split(key)
            _, state = env.reset_env(k_reset, params)
            positions = jnp.arange(n)

            def oracle(state):  # a face-down card, then the face-down card matching it
                down = ~state.face_up & (positions != state.first)
                same = state.types == state.types[jnp.maximum(state.first, 0)]
                pick = jnp.where(state.first >= 0, down & same, down)
                return jnp.argmax(pick)

            def step(carry, k):
                s_or, s_rnd, done_or, done_rnd = carry
                _, s_or, r_or, te_or, _ = env.step_env(k, s_or, oracle(s_or), params)
                a = jax.random.randint(k, (), 0, n)
                _, s_rnd, r_rnd, te_rnd, _ = env.step_env(k, s_rnd, a, params)
                tr_rnd = env.is_truncated(s_rnd, params)
                out = (jnp.where(done_or, 0.0, r_or), jnp.where(done_rnd, 0.0, r_rnd), te_or)
                return (s_or, s_rnd, done_or | te_or, done_rnd | te_rnd | tr_rnd), out

            keys = jax.random.split(k_act, params.max_steps_in_episode)
            init = (state, state, jnp.bool_(False), jnp.bool_(False))
            _, (r_or, r_rnd, te_or) = jax.lax.scan(step, init, keys)
            return r_or.sum(), r_rnd.sum(), jnp.argmax(te_or) + 1

        return jax.vmap(one)(keys)

    ret_or, ret_rnd, t_end = episodes(jax.random.split(jax.random.key(1), 32))
    np.testing.assert_allclose(ret_or, 1.0, atol=1e-5)
    np.testing.assert_array_equal(t_end, n)  # a perfect player needs exactly N flips
    assert np.all(ret_rnd >= -1.0 - 1e-5) and np.all(ret_rnd <= 1.0 + 1e-5)
    assert np.std(np.asarray(ret_rnd)) > 0


@pytest.mark.parametrize("env_id", ["ConcentrationEasy", "ConcentrationMedium"])
def test_deals_are_uniform_permutations(env_id):
    env, params, _ = compiled(env_id)
    n, num = env.num_cards, 8000
    decks = jax.jit(jax.vmap(lambda k: env.reset_env(k, params)[1].deck))(
        jax.random.split(jax.random.key(2), num)
    )
    decks = np.asarray(decks)
    np.testing.assert_array_equal(np.sort(decks, axis=1), np.tile(np.arange(n), (num, 1)))
    # Position x card counts: each expected num / n; chi-squared with (n - 1)^2 dof.
    counts = np.zeros((n, n))
    np.add.at(counts, (np.tile(np.arange(n), num), decks.reshape(-1)), 1)
    expected = num / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = (n - 1) ** 2
    assert abs(chi2 - dof) < 5 * np.sqrt(2 * dof), chi2
    # Neighbours are exchangeable: (n/2 - 1) / (n - 1) of the n - 1 neighbour pairs share a
    # colour on average (an unshuffled deck alternates colours and has none).
    same = ((decks[:, :-1] % 2) == (decks[:, 1:] % 2)).sum(axis=1)
    assert abs(same.mean() - (n / 2 - 1)) < 5 * same.std() / np.sqrt(num)


def test_jit_vmap_and_same_key_same_episode():
    env, params = envs.make("ConcentrationMedium")

    def episode(key):
        k_reset, k_act = jax.random.split(key)
        obs, state = env.reset(k_reset, params)
        actions = jax.random.randint(k_act, (50,), 0, env.num_actions)

        def step(state, a):
            obs, state, r, te, tr, _ = env.step(key, state, a, params)
            return state, (obs, r)

        return jax.lax.scan(step, state, actions)[1]

    run = jax.jit(jax.vmap(episode))
    keys = jax.random.split(jax.random.key(3), 4)
    a, b = run(keys), run(keys)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (4, 50, 104 * 3) and a[0].dtype == jnp.float32
    assert not np.array_equal(a[0][0], a[0][1])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="deck_type"):
        Concentration(deck_type="suits")
    with pytest.raises(ValueError, match="num_decks"):
        Concentration(num_decks=0)
