"""CountRecall (popgym 1.0.7): how many value cards of the query's type have been dealt so far?

Two independent decks, value and query, are dealt one card each per step. Obs: (value card type,
query card type), each one-hot(types). Actions: 0..N/types. Each of the N-1 steps pays ±1/(N-1)
for the count of the shown query's type among the value cards dealt so far, the shown one
included. Levels: (decks, types) = (1, colours 2) / (2, suits 4) / (4, ranks 13).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from envs.deck import CardGame, CardState, colour, one_hot, random_permutation, rank, suit

TYPES = {"colors": (2, colour), "suits": (4, suit), "ranks": (13, rank)}


@struct.dataclass
class CountRecallState(CardState):
    queries: jax.Array  # int32 [N]: the query deck in dealing order
    counts: jax.Array  # int32 [types]: value cards of each type dealt so far


class CountRecall(CardGame):
    def __init__(self, decks: int = 1, deck_type: str = "colors"):
        super().__init__(decks)
        if deck_type not in TYPES:
            raise ValueError(f"deck_type must be one of {', '.join(TYPES)}; got {deck_type!r}")
        self.num_types, self.card_type = TYPES[deck_type]
        self.obs_dim = 2 * self.num_types
        self._num_actions = self.num_cards // self.num_types + 1
        self.episode_length = self.num_cards - 1

    @property
    def num_actions(self) -> int:
        return self._num_actions

    def _new_state(self, dealt, queries=None):
        counts = jnp.zeros(self.num_types, jnp.int32).at[self.card_type(dealt[0])].add(1)
        return CountRecallState(time=0, dealt=dealt, queries=queries, counts=counts)

    def reset_env(self, key, params):
        kv, kq = jax.random.split(key)
        state = self._new_state(
            random_permutation(kv, self.num_cards), random_permutation(kq, self.num_cards)
        )
        return self._obs(state), state

    def reset_from_deck(self, value_idx, query_idx):
        """Start from popgym's value and query decks' `deck.idx` (for differential tests)."""
        as_dealt = lambda idx: jnp.asarray(idx, jnp.int32)[::-1]
        state = self._new_state(as_dealt(value_idx), as_dealt(query_idx))
        return self._obs(state), state

    def _obs(self, state):
        value = self.card_type(state.dealt[state.time])
        query = self.card_type(state.queries[state.time])
        return jnp.concatenate([one_hot(value, self.num_types), one_hot(query, self.num_types)])

    def step_env(self, key, state, action, params):
        answer = state.counts[self.card_type(state.queries[state.time])]
        scale = 1.0 / (self.num_cards - 1)
        reward = jnp.where(action == answer, scale, -scale)
        time = state.time + 1
        dealt_now = self.card_type(state.dealt[jnp.minimum(time, self.num_cards - 1)])
        state = state.replace(time=time, counts=state.counts.at[dealt_now].add(1))
        terminated = time >= self.num_cards - 1
        return self._obs(state), state, reward, terminated, {}


REGISTRY = {
    f"CountRecall{level}": functools.partial(CountRecall, decks=d, deck_type=t)
    for level, d, t in (("Easy", 1, "colors"), ("Medium", 2, "suits"), ("Hard", 4, "ranks"))
}
