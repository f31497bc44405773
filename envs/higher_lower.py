"""HigherLower (popgym 1.0.7): guess whether the next card ranks higher (action 0) or lower (1).

Obs: rank of the card just dealt, one-hot (13). Each of the N-1 steps pays +1/N for a right
guess, -1/N for a wrong one, 0 on a tie; terminated after N-1 steps. Even a clairvoyant scores
below 1 (ties). Levels: decks 1 / 2 / 3.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from envs.deck import CardGame, one_hot, rank


class HigherLower(CardGame):
    obs_dim = 13
    num_actions = 2

    def __init__(self, decks: int = 1):
        super().__init__(decks)
        self.episode_length = self.num_cards - 1

    def _obs(self, state):
        return one_hot(rank(state.dealt[state.time]), 13)

    def step_env(self, key, state, action, params):
        N = self.num_cards
        current = rank(state.dealt[state.time])
        upcoming = rank(state.dealt[jnp.minimum(state.time + 1, N - 1)])
        right = (upcoming > current) == (action == 0)
        reward = jnp.where(upcoming == current, 0.0, jnp.where(right, 1.0 / N, -1.0 / N))
        state = state.replace(time=state.time + 1)
        terminated = state.time >= N - 1
        return self._obs(state), state, reward, terminated, {}


REGISTRY = {
    f"HigherLower{level}": functools.partial(HigherLower, decks=d)
    for level, d in (("Easy", 1), ("Medium", 2), ("Hard", 3))
}
