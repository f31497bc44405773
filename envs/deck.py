"""Shared pieces of the POPGym card games (popgym/core/deck.py semantics).

Card id i of a deck of N = 52·decks cards has suit i % 4, rank (i // 4) % 13 and colour i % 2,
as popgym's `Deck` tiles them. popgym deals from the END of its shuffled `deck.idx`; here a deck is
stored in dealing order (`dealt[j]` is the j-th card dealt), so popgym's deck maps to
`deck.idx[::-1]`. A uniform permutation is uniform either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

DECK_SIZE = 52
_RANK_PERMUTATION_MAX = 104  # largest n for the O(n^2) rank permutation


def random_permutation(key: jax.Array, n: int) -> jax.Array:
    """A uniform random permutation of [0, n): int32 [n].

    For n <= 104: the ranks of n iid random 32-bit keys (ties, probability < n^2 / 2^33, broken
    by index); counting the keys above each key is O(n^2) but branch-free, and on a CPU as fast
    as or faster than `jax.random.permutation`'s sorts up to n = 104 (measured under vmap over
    1024 keys: 3 vs 5 ms at n = 52, 25 vs 27 ms at n = 104). Above that the O(n^2) count loses
    (91 vs 22 ms at n = 156, 2.0 vs 0.22 s at n = 832), so larger decks use
    `jax.random.permutation`.
    """
    if n > _RANK_PERMUTATION_MAX:
        return jax.random.permutation(key, n).astype(jnp.int32)
    bits = jax.random.bits(key, (n,), jnp.uint32)
    idx = jnp.arange(n)
    above = (bits[None, :] > bits[:, None]) | (
        (bits[None, :] == bits[:, None]) & (idx[None, :] < idx[:, None])
    )  # [n, n]: key j ranks before key i
    # int16 sums vectorise much better than int32 ones on XLA:CPU (measured 5x at n = 104).
    return above.sum(axis=1, dtype=jnp.int16).astype(jnp.int32)


def suit(card):
    return card % 4


def rank(card):
    return (card // 4) % 13


def colour(card):
    return card % 2


@struct.dataclass
class CardState(environment.EnvState):
    dealt: jax.Array  # int32 [N]: card ids in dealing order (popgym's deck.idx reversed)


@struct.dataclass
class CardParams(environment.EnvParams):
    max_steps_in_episode: int = 51


class CardGame(environment.Environment):
    """Base of the POPGym card games: a deck of `decks` × 52 cards dealt in a random order.

    Subclasses set `obs_dim`, `num_actions`, `episode_length` and implement `_obs(state)` and
    `step_env`. Episodes end by termination (as in popgym); truncation only fires if the caller
    sets `max_steps_in_episode` below the natural length.
    """

    obs_dim: int
    episode_length: int

    def __init__(self, decks: int):
        super().__init__()
        if not isinstance(decks, int) or decks < 1:
            raise ValueError(f"decks must be a positive int; got {decks!r}")
        self.decks = decks
        self.num_cards = DECK_SIZE * decks

    @property
    def default_params(self) -> CardParams:
        return CardParams(max_steps_in_episode=self.episode_length)

    def _new_state(self, dealt: jax.Array) -> CardState:
        return CardState(time=0, dealt=dealt)

    def reset_env(self, key, params):
        state = self._new_state(random_permutation(key, self.num_cards))
        return self._obs(state), state

    def reset_from_deck(self, idx):
        """Start from popgym's shuffled `deck.idx` (for differential tests)."""
        state = self._new_state(jnp.asarray(idx, jnp.int32)[::-1])
        return self._obs(state), state

    def is_truncated(self, state, params):
        return (state.time >= params.max_steps_in_episode) & (state.time < self.episode_length)

    def observation_space(self, params):
        return spaces.Box(0.0, 1.0, (self.obs_dim,), jnp.float32)

    def action_space(self, params):
        return spaces.Discrete(self.num_actions)

    @property
    def name(self) -> str:
        return type(self).__name__


def one_hot(x, n):
    return jax.nn.one_hot(x, n, dtype=jnp.float32)
