"""RepeatFirst, RepeatPrevious, Autoencode, CountRecall and HigherLower against the popgym 1.0.7
package itself: popgym's shuffled deck is injected into the JAX state, both play the same actions
(random, and an oracle that reads the hidden deck), and every step must give the same one-hot
observation, reward, terminated and truncated."""

import functools
import re

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from popgym.envs import autoencode, count_recall, higher_lower, repeat_first, repeat_previous
from scipy import stats

import envs
from envs.deck import rank, suit

FAMILIES = {
    "RepeatFirst": repeat_first,
    "RepeatPrevious": repeat_previous,
    "Autoencode": autoencode,
    "CountRecall": count_recall,
    "HigherLower": higher_lower,
}
IDS = [f"{family}{level}" for family in FAMILIES for level in ("Easy", "Medium", "Hard")]


def one_hot_popgym(obs, space) -> np.ndarray:
    """popgym's observation, each discrete part one-hot, concatenated."""
    if isinstance(space, gym.spaces.Discrete):
        return np.eye(space.n)[int(obs)]
    if isinstance(space, gym.spaces.MultiDiscrete):
        return np.concatenate([np.eye(n)[int(o)] for o, n in zip(obs, space.nvec, strict=True)])
    if isinstance(space, gym.spaces.Tuple):
        return np.concatenate(
            [one_hot_popgym(o, s) for o, s in zip(obs, space.spaces, strict=True)]
        )
    raise TypeError(space)


def oracle(env, state):
    """The right action from the hidden state (HigherLower: the clairvoyant's guess)."""
    t, dealt, N = state.time, state.dealt, env.num_cards
    family = type(env).__name__
    if family == "RepeatFirst":
        return suit(dealt[0])
    if family == "RepeatPrevious":
        return suit(dealt[jnp.maximum(t + 1 - env.k, 0)])
    if family == "Autoencode":
        return suit(dealt[jnp.clip(N - 1 - (t - (N - 1)), 0, N - 1)])
    if family == "CountRecall":
        return state.counts[env.card_type(state.queries[t])]
    return jnp.where(rank(dealt[jnp.minimum(t + 1, N - 1)]) > rank(dealt[t]), 0, 1)


@functools.cache
def jitted(env_id):
    env, params = envs.make(env_id)
    step = jax.jit(lambda s, a: env.step_env(jax.random.PRNGKey(0), s, a, params))
    truncated = jax.jit(lambda s: env.is_truncated(s, params))
    return env, params, step, truncated, jax.jit(lambda s: oracle(env, s))


def play(env_id, seed, policy):
    """Play one episode in popgym and in JAX side by side; returns the total reward."""
    family = re.sub("(Easy|Medium|Hard)$", "", env_id)
    ref = getattr(FAMILIES[family], env_id)()
    ref_obs, _ = ref.reset(seed=seed)
    env, params, step, truncated_fn, oracle_fn = jitted(env_id)
    if family == "CountRecall":
        obs, state = env.reset_from_deck(ref.value_deck.idx.copy(), ref.query_deck.idx.copy())
    else:
        obs, state = env.reset_from_deck(ref.deck.idx.copy())
    np.testing.assert_array_equal(np.asarray(obs), one_hot_popgym(ref_obs, ref.observation_space))
    rng = np.random.default_rng(seed)
    total, steps = 0.0, 0
    while True:
        if policy == "oracle":
            action = int(oracle_fn(state))
        else:
            action = int(rng.integers(env.num_actions))
        ref_obs, ref_reward, ref_term, ref_trunc, _ = ref.step(action)
        obs, state, reward, terminated, _ = step(state, action)
        steps += 1
        where = f"{env_id} seed {seed} step {steps}"
        np.testing.assert_array_equal(
            np.asarray(obs), one_hot_popgym(ref_obs, ref.observation_space), err_msg=where
        )
        assert abs(float(reward) - ref_reward) < 1e-6, where
        assert bool(terminated) == ref_term and bool(truncated_fn(state)) == ref_trunc, where
        total += float(reward)
        if ref_term or ref_trunc:
            assert steps == env.episode_length == params.max_steps_in_episode, where
            return total


@pytest.mark.parametrize("env_id", IDS)
def test_matches_popgym_step_by_step(env_id):
    for seed in range(3):
        total = play(env_id, seed, "random")
        assert -1.0 - 1e-5 <= total <= 1.0 + 1e-5
    oracle_total = play(env_id, 100, "oracle")
    if env_id.startswith("HigherLower"):
        assert 0.8 < oracle_total < 1.0  # ties pay 0, so even the clairvoyant stays below 1
    else:
        assert abs(oracle_total - 1.0) < 1e-5


def test_observation_and_action_sizes():
    sizes = {"AutoencodeEasy": (6, 4), "CountRecallEasy": (4, 27), "CountRecallMedium": (8, 27)}
    sizes |= {"CountRecallHard": (26, 17), "HigherLowerHard": (13, 2), "RepeatFirstHard": (4, 4)}
    for env_id, (obs_dim, actions) in sizes.items():
        env, params = envs.make(env_id)
        assert env.observation_space(params).shape == (obs_dim,)
        assert env.action_space(params).n == actions


def test_deals_are_uniform_permutations():
    env, params = envs.make("RepeatPreviousEasy")
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    _, state = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))(keys, params)
    dealt = np.asarray(state.dealt)
    assert all(np.array_equal(np.sort(d), np.arange(52)) for d in dealt[:100])
    # where card 0 lies, and which card comes first: both uniform over 52 positions / cards
    for sample in (np.argmax(dealt == 0, axis=1), dealt[:, 0]):
        counts = np.bincount(sample, minlength=52)
        assert stats.chisquare(counts).pvalue > 1e-3
    assert len({tuple(d) for d in dealt}) == len(dealt)


def test_jit_vmap_and_same_key_same_episode():
    env, params = envs.make("CountRecallMedium")

    def episode(key):
        obs, state = env.reset_env(key, params)

        def body(state, k):
            a = jax.random.randint(k, (), 0, env.num_actions)
            obs, state, reward, done, _ = env.step_env(k, state, a, params)
            return state, (obs, reward)

        return jax.lax.scan(body, state, jax.random.split(key, env.episode_length))[1]

    run = jax.jit(jax.vmap(episode))
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    (o1, r1), (o2, r2) = run(keys), run(keys)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
    np.testing.assert_array_equal(np.asarray(r1), np.asarray(r2))
    assert not np.array_equal(np.asarray(o1[0]), np.asarray(o1[1]))


def test_bad_arguments():
    from envs.repeat_previous import RepeatPrevious

    with pytest.raises(ValueError, match="k must be in"):
        RepeatPrevious(decks=1, k=52)
    with pytest.raises(ValueError, match="deck_type must be one of"):
        envs.make("CountRecallEasy", deck_type="jokers")
    with pytest.raises(ValueError, match="decks must be a positive int"):
        envs.make("AutoencodeEasy", decks=0)
