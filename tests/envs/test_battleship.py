"""Battleship vs popgym 1.0.7: same board + same guesses -> same obs, rewards, flags; ship
placements with popgym's per-cell marginals."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from popgym.envs import battleship as pg

import envs
from envs.battleship import Battleship, ship_segments

LEVELS = ["BattleshipEasy", "BattleshipMedium", "BattleshipHard"]
NUM_SEEDS = 12


@functools.cache
def compiled(env_id: str):
    """(env, params, jitted rollout(board [B*B], actions [T]) -> obs0, (obs, rew, term, trunc))."""
    env, params = envs.make(env_id)

    @jax.jit
    def rollout(board, actions):
        obs0, state = env.reset_from_board(board)

        def step(state, a):
            obs, state, reward, term, _ = env.step_env(jax.random.key(0), state, a, params)
            return state, (obs, reward, term, env.is_truncated(state, params))

        return obs0, jax.lax.scan(step, state, actions)[1]

    return env, params, rollout


def play_popgym(pg_env, rng: np.random.Generator, skill: float):
    """One popgym episode; with prob `skill` guess a ship cell (maybe one hit before), else a
    uniform cell. Returns flat actions, one-hot obs, rewards, terminated, truncated."""
    b = pg_env.board_size
    ship_cells = np.flatnonzero(pg_env.board)
    records = []
    done = False
    while not done:
        a = int(rng.choice(ship_cells)) if rng.random() < skill else int(rng.integers(b * b))
        o, r, te, tr, _ = pg_env.step(np.array([a // b, a % b]))
        records.append((a, np.eye(2, dtype=np.float32)[o], r, te, tr))
        done = te or tr
    return [np.asarray(x) for x in zip(*records, strict=True)]


@pytest.mark.parametrize("env_id", LEVELS)
def test_matches_popgym(env_id):
    env, params, rollout = compiled(env_id)
    pg_env = getattr(pg, env_id)()
    assert env.obs_requires_prev_action == pg_env.obs_requires_prev_action
    assert env.num_actions == int(np.prod(pg_env.action_space.nvec))
    assert env.observation_space(params).shape == (pg_env.observation_space.n,)
    rng = np.random.default_rng(0)
    endings = set()
    for seed in range(NUM_SEEDS):
        pg_obs0, _ = pg_env.reset(seed=seed)
        board = pg_env.board.copy()
        actions, obs, rewards, terms, truncs = play_popgym(pg_env, rng, [0, 0.5, 0.9][seed % 3])
        T = len(actions)
        padded = np.zeros(params.max_steps_in_episode, np.int32)
        padded[:T] = actions
        obs0, (j_obs, j_rew, j_term, j_trunc) = rollout(jnp.asarray(board), jnp.asarray(padded))
        np.testing.assert_array_equal(obs0, np.eye(2)[pg_obs0])
        np.testing.assert_array_equal(np.asarray(j_obs)[:T], obs)
        np.testing.assert_allclose(np.asarray(j_rew)[:T], rewards, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(j_term)[:T], terms)
        np.testing.assert_array_equal(np.asarray(j_trunc)[:T], truncs)
        endings.add((bool(terms[-1]), bool(truncs[-1]), T == params.max_steps_in_episode))
    assert (True, False, False) in endings and (False, True, True) in endings


def test_segments_cover_every_placement_once():
    for b, s in [(8, 2), (10, 3), (12, 4)]:
        seg = ship_segments(b, s)
        assert seg.shape == (2 * b * (b - s + 1), s)
        rows, cols = seg // b, seg % b
        straight = (np.ptp(rows, axis=1) == 0) & (np.ptp(cols, axis=1) == s - 1)
        straight |= (np.ptp(cols, axis=1) == 0) & (np.ptp(rows, axis=1) == s - 1)
        assert straight.all()
        assert len({tuple(sorted(x)) for x in seg.tolist()}) == len(seg)


def popgym_boards(env_id: str, num: int) -> np.ndarray:
    pg_env = getattr(pg, env_id)()
    pg_env.reset(seed=123)
    boards = []
    for _ in range(num):
        pg_env.reset()
        boards.append(pg_env.board.reshape(-1).copy())
    return np.asarray(boards, bool)


@pytest.mark.parametrize("env_id", ["BattleshipEasy", "BattleshipHard"])
def test_placement_marginals_match_popgym(env_id):
    """Per-cell ship frequencies: two-sample chi-squared, JAX vs popgym's own placement."""
    env, params, _ = compiled(env_id)
    num = 4000
    ref = popgym_boards(env_id, num)
    ours = np.asarray(
        jax.jit(jax.vmap(env.sample_board))(jax.random.split(jax.random.key(4), 4 * num))
    )
    assert (ours.sum(axis=1) == env.needed_hits).all()  # ships never overlap
    p_ref, p_ours = ref.mean(0), ours.mean(0)
    pooled = (ref.sum(0) + ours.sum(0)) / (5 * num)
    var = pooled * (1 - pooled) * (1 / num + 1 / (4 * num))
    chi2 = ((p_ref - p_ours) ** 2 / var).sum()
    dof = env.num_cells
    assert chi2 < dof + 5 * np.sqrt(2 * dof), chi2
    # The test has power: ships avoid corners (popgym's corner rate is far below the centre's).
    assert p_ours[0] < 0.7 * p_ours[(env.board_size // 2) * (env.board_size + 1)]


def test_first_ship_uniform_over_segments():
    """The first ship (size 2) is uniform over all its placements, as popgym's rejection."""
    env1 = Battleship(board_size=8, ship_sizes=(2,))
    boards = np.asarray(jax.vmap(env1.sample_board)(jax.random.split(jax.random.key(5), 22400)))
    seg = ship_segments(8, 2)
    which = np.argmax(boards[:, seg].all(axis=2), axis=1)
    counts = np.bincount(which, minlength=len(seg))
    expected = len(boards) / len(seg)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < len(seg) + 5 * np.sqrt(2 * len(seg)), chi2


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
                a_or = jnp.argmax(s_or.board & ~s_or.guesses)
                _, s_or, r_or, te_or, _ = env.step_env(k, s_or, a_or, params)
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
    np.testing.assert_array_equal(t_end, env.needed_hits)
    low = -n / (n - env.needed_hits)  # every guess a miss
    assert np.all(ret_rnd >= low - 1e-5) and np.all(ret_rnd <= 1.0 + 1e-5)
    assert np.std(np.asarray(ret_rnd)) > 0


def test_jit_vmap_and_same_key_same_episode():
    env, params = envs.make("BattleshipMedium")

    def episode(key):
        k_reset, k_act = jax.random.split(key)
        _, state = env.reset(k_reset, params)
        actions = jax.random.randint(k_act, (120,), 0, env.num_actions)

        def step(state, a):
            obs, state, r, te, tr, _ = env.step(key, state, a, params)
            return state, (obs, r, te | tr)

        return jax.lax.scan(step, state, actions)[1]

    run = jax.jit(jax.vmap(episode))
    keys = jax.random.split(jax.random.key(3), 4)
    a, b = run(keys), run(keys)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == (4, 120, 2) and a[0].dtype == jnp.float32
    assert a[2][:, 99].all()  # truncated at step B*B = 100 at the latest (then auto-reset)
    assert not np.array_equal(a[0][0], a[0][1])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="board_size"):
        Battleship(board_size=0)
    with pytest.raises(ValueError, match="ship_sizes"):
        Battleship(board_size=3, ship_sizes=(4,))


def exact_board_distribution(b: int, sizes: tuple[int, ...]) -> dict[bytes, float]:
    """Exact law of the final board when each ship is uniform over the free segments."""
    dist = {np.zeros(b * b, bool).tobytes(): 1.0}
    for s in sizes:
        seg = ship_segments(b, s)
        nxt: dict[bytes, float] = {}
        for key, p in dist.items():
            board = np.frombuffer(key, bool)
            free = seg[~board[seg].any(axis=1)]
            for cells in free:
                new = board.copy()
                new[cells] = True
                nxt[new.tobytes()] = nxt.get(new.tobytes(), 0.0) + p / len(free)
        dist = nxt
    return dist


def test_small_board_law_matches_popgym_and_exact():
    """On a 4x4 board with ships (2, 3) the whole board law is enumerable: popgym's rejection
    sampler and ours both follow it (chi-squared over all boards)."""
    sizes = (2, 3)
    law = exact_board_distribution(4, sizes)
    keys = list(law)
    probs = np.array([law[k] for k in keys])
    index = {k: i for i, k in enumerate(keys)}
    num = 12000
    pg_env = pg.Battleship(board_size=4, ship_sizes=list(sizes))
    pg_env.reset(seed=7)
    pg_counts = np.zeros(len(keys))
    for _ in range(num):
        pg_env.reset()
        pg_counts[index[pg_env.board.reshape(-1).astype(bool).tobytes()]] += 1
    env = Battleship(board_size=4, ship_sizes=sizes)
    ours = np.asarray(jax.jit(jax.vmap(env.sample_board))(jax.random.split(jax.random.key(8), num)))
    our_counts = np.bincount([index[x.tobytes()] for x in ours], minlength=len(keys))
    dof = len(keys) - 1
    for counts in (pg_counts, our_counts):
        chi2 = ((counts - num * probs) ** 2 / (num * probs)).sum()
        assert chi2 < dof + 5 * np.sqrt(2 * dof), chi2
    # Power: placing the ships in the other order gives a detectably different law.
    swapped = Battleship(board_size=4, ship_sizes=sizes[::-1])
    other = np.asarray(
        jax.jit(jax.vmap(swapped.sample_board))(jax.random.split(jax.random.key(9), num))
    )
    other_counts = np.bincount([index[x.tobytes()] for x in other], minlength=len(keys))
    assert ((other_counts - num * probs) ** 2 / (num * probs)).sum() > dof + 5 * np.sqrt(2 * dof)


def test_sampling_helpers_are_exact():
    """The reset's multiply-shift draw and j-th-free-segment lookup vs numpy."""
    from envs.battleship import _nth_true, _uniform_below

    bits = jax.random.bits(jax.random.key(0), (50000,), jnp.uint32)
    for n in [1, 7, 264, 65535]:
        exact = (np.asarray(bits).astype(np.uint64) * n) >> 32
        np.testing.assert_array_equal(_uniform_below(bits, jnp.uint32(n)), exact)
    rng = np.random.default_rng(0)
    nth = jax.jit(_nth_true)
    for n in [1, 15, 16, 17, 112, 264]:
        for _ in range(10):
            mask = rng.random(n) < rng.random()
            mask[rng.integers(n)] = True
            j = int(rng.integers(mask.sum()))
            assert int(nth(jnp.asarray(mask), j)) == np.flatnonzero(mask)[j]
