"""Autoencode beyond the step-by-step popgym comparison in test_card_games.py: deals of the
larger decks (drawn with `jax.random.permutation`, not the O(n^2) rank permutation) are uniform,
and the watch phase shows the dealt suits (popjaxrl showed all-zero watch observations)."""

import jax
import numpy as np
from scipy import stats

import envs


def test_hard_deals_are_uniform_permutations():
    env, params = envs.make("AutoencodeHard")  # N = 156 > 104: the jax.random.permutation path
    keys = jax.random.split(jax.random.PRNGKey(1), 3000)
    obs, state = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))(keys, params)
    dealt = np.asarray(state.dealt)
    assert all(np.array_equal(np.sort(d), np.arange(156)) for d in dealt[:50])
    # suit of the first card: uniform over 4; position of card 0: uniform over 156 positions
    np.testing.assert_array_equal(np.asarray(obs)[:, 2:].argmax(1), dealt[:, 0] % 4)
    assert stats.chisquare(np.bincount(dealt[:, 0] % 4, minlength=4)).pvalue > 1e-3
    counts = np.bincount(np.argmax(dealt == 0, axis=1), minlength=156)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_watch_phase_shows_every_dealt_suit_then_play_shows_zero():
    env, params = envs.make("AutoencodeEasy")
    n = env.num_cards

    def episode(key):
        obs, state = env.reset_env(key, params)

        def body(state, a):
            obs, state, reward, done, _ = env.step_env(key, state, a, params)
            return state, (obs, reward, done)

        _, (o, r, d) = jax.lax.scan(body, state, np.zeros(2 * n - 1, np.int32))
        return obs, o, r, d, state.dealt

    obs0, o, r, d, dealt = jax.jit(episode)(jax.random.PRNGKey(7))
    o, r, d, dealt = map(np.asarray, (o, r, d, dealt))
    shown = np.concatenate([np.asarray(obs0)[None], o])  # [2N, 6]
    flags, suits = shown[:, :2].argmax(1), shown[:, 2:].argmax(1)
    assert np.all(shown.sum(1) == 2)  # always one flag and one suit, never all zeros
    np.testing.assert_array_equal(flags, [1] * (n - 1) + [0] * (n + 1))
    np.testing.assert_array_equal(suits[:n], dealt % 4)
    np.testing.assert_array_equal(suits[n:], 0)
    assert np.all(r[: n - 1] == 0)
    # always naming suit 0 in the play phase: +1/N for each suit-0 card, -1/N for the others
    expected = np.where(dealt[::-1] % 4 == 0, 1.0, -1.0) / n
    np.testing.assert_allclose(r[n - 1 :], expected, rtol=1e-6)
    np.testing.assert_array_equal(d, [False] * (2 * n - 2) + [True])
