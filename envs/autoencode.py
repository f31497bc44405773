"""Autoencode (popgym 1.0.7): watch a deck's suits, then play them back in REVERSE order.

Obs: (phase flag: watch = 1 / play = 0, one-hot 2) + (suit, one-hot 4) = 6. Reset shows
(1, card 0); the N-1 watch steps deal one card each and pay 0, the last dealt card shown with
flag 0; then N play steps pay ±1/N for the suit of the cards in reverse dealing order, observing
(0, suit 0). Terminated after 2N-1 steps. Levels: decks 1 / 2 / 3.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from envs.deck import CardGame, one_hot, suit


class Autoencode(CardGame):
    obs_dim = 6
    num_actions = 4

    def __init__(self, decks: int = 1):
        super().__init__(decks)
        self.episode_length = 2 * self.num_cards - 1

    def _obs(self, state):
        N = self.num_cards
        watching = state.time < N - 1  # the deck still holds cards after this deal
        shown = jnp.where(state.time <= N - 1, suit(state.dealt[jnp.minimum(state.time, N - 1)]), 0)
        return jnp.concatenate([one_hot(jnp.asarray(watching, jnp.int32), 2), one_hot(shown, 4)])

    def step_env(self, key, state, action, params):
        N = self.num_cards
        playing = state.time >= N - 1
        j = state.time - (N - 1)  # index of this play step
        target = suit(state.dealt[jnp.clip(N - 1 - j, 0, N - 1)])
        reward = jnp.where(playing, jnp.where(action == target, 1.0 / N, -1.0 / N), 0.0)
        state = state.replace(time=state.time + 1)
        terminated = state.time >= 2 * N - 1
        return self._obs(state), state, reward, terminated, {}


REGISTRY = {
    f"Autoencode{level}": functools.partial(Autoencode, decks=d)
    for level, d in (("Easy", 1), ("Medium", 2), ("Hard", 3))
}
