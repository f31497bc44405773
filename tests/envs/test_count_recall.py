"""CountRecall beyond test_card_games.py: the value and query decks are two independent uniform
permutations, and the action count is N / types + 1 (popjaxrl had 2 actions)."""

import jax
import numpy as np
from scipy import stats

import envs


def test_value_and_query_decks_are_independent_uniform_permutations():
    env, params = envs.make("CountRecallHard")  # N = 208 > 104: the jax.random.permutation path
    keys = jax.random.split(jax.random.PRNGKey(2), 3000)
    _, state = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))(keys, params)
    value, query = np.asarray(state.dealt), np.asarray(state.queries)
    for deck in (value, query):
        assert all(np.array_equal(np.sort(d), np.arange(208)) for d in deck[:50])
        assert stats.chisquare(np.bincount(deck[:, 0] % 52 // 4, minlength=13)).pvalue > 1e-3
    assert not np.any(np.all(value == query, axis=1))
    # the first value rank and the first query rank are independent (13 x 13 contingency table)
    table = np.zeros((13, 13))
    np.add.at(table, (value[:, 0] % 52 // 4, query[:, 0] % 52 // 4), 1)
    assert stats.chi2_contingency(table).pvalue > 1e-3
    # counts start with the first value card
    np.testing.assert_array_equal(np.asarray(state.counts).argmax(1), value[:, 0] % 52 // 4)
    assert np.all(np.asarray(state.counts).sum(1) == 1)


def test_action_counts():
    for env_id, n in (("CountRecallEasy", 27), ("CountRecallMedium", 27), ("CountRecallHard", 17)):
        env, params = envs.make(env_id)
        assert env.action_space(params).n == n == env.num_actions
