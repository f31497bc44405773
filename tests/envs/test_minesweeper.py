"""MineSweeper vs popgym 1.0.7: same mines + same clicks -> same obs, rewards, flags; mines a
uniform random subset."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from popgym.envs import minesweeper as pg

import envs
from envs.minesweeper import MineSweeper

LEVELS = ["MineSweeperEasy", "MineSweeperMedium", "MineSweeperHard"]
NUM_SEEDS = 16


@functools.cache
def compiled(env_id: str):
    """(env, params, jitted rollout(mines [R*C], actions [T]) -> obs0, (obs, rew, term, trunc))."""
    env, params = envs.make(env_id)

    @jax.jit
    def rollout(mines, actions):
        obs0, state = env.reset_from_mines(mines)

        def step(state, a):
            obs, state, reward, term, _ = env.step_env(jax.random.key(0), state, a, params)
            return state, (obs, reward, term, env.is_truncated(state, params))

        return obs0, jax.lax.scan(step, state, actions)[1]

    return env, params, rollout


def play_popgym(pg_env, rng: np.random.Generator, mode: int):
    """One popgym episode. mode 0: uniform clicks (mostly ends on a mine); 1: uniform safe
    cells, repeats included (mostly truncated); 2: unclicked safe cells (wins on the last
    allowed step); 3: as 2 with a 10% chance of a uniform click (repeats and mines late)."""
    rows, cols = pg_env.dims
    records = []
    done = False
    while not done:
        grid = pg_env.hidden_grid.reshape(-1)
        safe = np.flatnonzero(grid != pg.HiddenSquare.MINE)
        fresh = np.flatnonzero(grid == pg.HiddenSquare.CLEAR)
        a = int(rng.integers(rows * cols))
        if mode == 1:
            a = int(rng.choice(safe))
        elif mode == 2 or (mode == 3 and rng.random() < 0.9):
            a = int(rng.choice(fresh))
        o, r, te, tr, _ = pg_env.step(np.array([a // cols, a % cols]))
        records.append((a, np.eye(pg_env.observation_space.n, dtype=np.float32)[o], r, te, tr))
        done = te or tr
    return [np.asarray(x) for x in zip(*records, strict=True)]


@pytest.mark.parametrize("env_id", LEVELS)
def test_matches_popgym(env_id):
    env, params, rollout = compiled(env_id)
    pg_env = getattr(pg, env_id)()
    assert env.obs_requires_prev_action == pg_env.obs_requires_prev_action
    assert env.num_actions == int(np.prod(pg_env.action_space.nvec))
    assert env.observation_space(params).shape == (pg_env.observation_space.n,)
    assert params.max_steps_in_episode == pg_env.max_episode_length
    rng = np.random.default_rng(0)
    endings, rewards_seen = set(), set()
    for seed in range(NUM_SEEDS):
        pg_obs0, _ = pg_env.reset(seed=seed)
        mines = pg_env.hidden_grid.reshape(-1) == pg.HiddenSquare.MINE
        actions, obs, rewards, terms, truncs = play_popgym(pg_env, rng, seed % 4)
        T = len(actions)
        padded = np.zeros(params.max_steps_in_episode, np.int32)
        padded[:T] = actions
        obs0, (j_obs, j_rew, j_term, j_trunc) = rollout(jnp.asarray(mines), jnp.asarray(padded))
        np.testing.assert_array_equal(obs0, np.eye(pg_env.observation_space.n)[pg_obs0])
        np.testing.assert_array_equal(np.asarray(j_obs)[:T], obs)
        np.testing.assert_allclose(np.asarray(j_rew)[:T], rewards, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(j_term)[:T], terms)
        np.testing.assert_array_equal(np.asarray(j_trunc)[:T], truncs)
        won = terms[-1] and rewards[-1] > 0
        endings.add((bool(terms[-1]), bool(truncs[-1]), bool(won)))
        rewards_seen.update(np.round(rewards, 6).tolist())
    # Mine, win and truncation all happened, and all three reward values.
    assert {(True, False, False), (True, False, True), (False, True, False)} <= endings
    assert len(rewards_seen) == 3


def test_mines_are_a_uniform_subset():
    env, params, _ = compiled("MineSweeperMedium")
    num = 20000
    mines = np.asarray(
        jax.jit(jax.vmap(env.sample_mines))(jax.random.split(jax.random.key(2), num))
    ).astype(float)
    n, m = env.num_cells, env.num_mines
    assert (mines.sum(axis=1) == m).all()
    # Per-cell marginals m / n (popgym's choice without replacement), chi-squared.
    expected = num * m / n
    chi2 = ((mines.sum(0) - expected) ** 2 / expected).sum()
    assert chi2 < (n - 1) + 5 * np.sqrt(2 * (n - 1)), chi2
    # Pairs: P(i and j mined) = m (m - 1) / (n (n - 1)) for every pair i < j.
    both = mines.T @ mines
    iu = np.triu_indices(n, 1)
    expected = num * m * (m - 1) / (n * (n - 1))
    chi2 = ((both[iu] - expected) ** 2 / expected).sum()
    dof = len(iu[0]) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), chi2


@pytest.mark.parametrize("env_id", LEVELS)
def test_oracle_reaches_one_and_random_stays_in_bounds(env_id):
    env, params, _ = compiled(env_id)
    n = env.num_cells

    @jax.jit
    def episodes(keys):
        def one(key):
            k_reset, k_act = jax.random.split(key)
            _, state = env.reset_env(k_reset, params)

            def step(carry, k):
                s_or, s_rnd, done_or, done_rnd = carry
                a_or = jnp.argmax(~s_or.mines & ~s_or.viewed)
                _, s_or, r_or, te_or, _ = env.step_env(k, s_or, a_or, params)
                tr_or = env.is_truncated(s_or, params)
                a = jax.random.randint(k, (), 0, n)
                _, s_rnd, r_rnd, te_rnd, _ = env.step_env(k, s_rnd, a, params)
                tr_rnd = env.is_truncated(s_rnd, params)
                out = (jnp.where(done_or, 0.0, r_or), jnp.where(done_rnd, 0.0, r_rnd))
                out += (te_or & ~done_or, tr_or & ~done_or)
                return (s_or, s_rnd, done_or | te_or, done_rnd | te_rnd | tr_rnd), out

            keys = jax.random.split(k_act, params.max_steps_in_episode)
            init = (state, state, jnp.bool_(False), jnp.bool_(False))
            _, (r_or, r_rnd, te_or, tr_or) = jax.lax.scan(step, init, keys)
            return r_or.sum(), r_rnd.sum(), jnp.argmax(te_or) + 1, tr_or.any()

        return jax.vmap(one)(keys)

    ret_or, ret_rnd, t_end, truncated = episodes(jax.random.split(jax.random.key(1), 32))
    np.testing.assert_allclose(ret_or, 1.0, atol=1e-5)
    # The win comes on the last allowed step and is a termination, not a truncation.
    np.testing.assert_array_equal(t_end, env.num_safe)
    assert not np.asarray(truncated).any()
    assert np.all(ret_rnd >= -1.0 - 1e-5) and np.all(ret_rnd <= 1.0 + 1e-5)
    assert np.std(np.asarray(ret_rnd)) > 0


def test_jit_vmap_and_same_key_same_episode():
    env, params = envs.make("MineSweeperHard")

    def episode(key):
        k_reset, k_act = jax.random.split(key)
        _, state = env.reset(k_reset, params)
        actions = jax.random.randint(k_act, (60,), 0, env.num_actions)

        def step(state, a):
            obs, state, r, te, tr, info = env.step(key, state, a, params)
            return state, (obs, r, te, tr, info["success"])

        return jax.lax.scan(step, state, actions)[1]

    run = jax.jit(jax.vmap(episode))
    keys = jax.random.split(jax.random.key(3), 4)
    a, b = run(keys), run(keys)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == (4, 60, 10) and a[0].dtype == jnp.float32
    assert not np.array_equal(a[1][0], a[1][1])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_mines"):
        MineSweeper(rows=2, cols=2, num_mines=2)
    with pytest.raises(ValueError, match="rows"):
        MineSweeper(rows=0)
