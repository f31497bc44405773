"""RepeatFirst (popgym 1.0.7): name the FIRST card's suit at every step.

Obs: the suit of the card just dealt, one-hot (4). Actions: 4 suits. Each of the N-1 steps pays
+1/(N-1) for the first card's suit and -1/(N-1) otherwise; terminated after N-1 steps.
Levels: decks 1 / 8 / 16.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from envs.deck import CardGame, one_hot, suit


class RepeatFirst(CardGame):
    obs_dim = 4
    num_actions = 4

    def __init__(self, decks: int = 1):
        super().__init__(decks)
        self.episode_length = self.num_cards - 1

    def _obs(self, state):
        return one_hot(suit(state.dealt[state.time]), 4)

    def step_env(self, key, state, action, params):
        scale = 1.0 / (self.num_cards - 1)
        reward = jnp.where(action == suit(state.dealt[0]), scale, -scale)
        state = state.replace(time=state.time + 1)
        terminated = state.time >= self.num_cards - 1
        return self._obs(state), state, reward, terminated, {}


REGISTRY = {
    f"RepeatFirst{level}": functools.partial(RepeatFirst, decks=d)
    for level, d in (("Easy", 1), ("Medium", 8), ("Hard", 16))
}
