"""RepeatPrevious (popgym 1.0.7): name the suit of the card shown k-1 steps before the current one.

Obs: the suit of the card just dealt, one-hot (4). Actions: 4 suits. Once k cards are in hand,
each step pays ±1/(N-k) for the suit of `hand[-k]`; 0 before. Terminated after N-1 steps.
Levels: (decks, k) = (1, 4) / (2, 32) / (3, 64).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from envs.deck import CardGame, one_hot, suit


class RepeatPrevious(CardGame):
    obs_dim = 4
    num_actions = 4

    def __init__(self, decks: int = 1, k: int = 4):
        super().__init__(decks)
        if not 1 <= k < self.num_cards:
            raise ValueError(f"k must be in [1, {self.num_cards}) for {decks} deck(s); got {k}")
        self.k = k
        self.episode_length = self.num_cards - 1

    def _obs(self, state):
        return one_hot(suit(state.dealt[state.time]), 4)

    def step_env(self, key, state, action, params):
        hand = state.time + 1  # cards in hand before this step's deal
        target = suit(state.dealt[jnp.maximum(hand - self.k, 0)])
        scale = 1.0 / (self.num_cards - self.k)
        reward = jnp.where(hand >= self.k, jnp.where(action == target, scale, -scale), 0.0)
        state = state.replace(time=state.time + 1)
        terminated = state.time >= self.num_cards - 1
        return self._obs(state), state, reward, terminated, {}


REGISTRY = {
    f"RepeatPrevious{level}": functools.partial(RepeatPrevious, decks=d, k=k)
    for level, d, k in (("Easy", 1, 4), ("Medium", 2, 32), ("Hard", 3, 64))
}
