"""Concentration (POPGym): find the matching pairs among face-down cards, in JAX.

A rule-for-rule port of `popgym.envs.concentration` (popgym 1.0.7):

- A shuffled deck of N = 52 x decks cards lies face down; position i holds card `deck[i]`
  (popgym's `deck.idx`, a uniform permutation). Cards match on their colour (2 types; Easy,
  Medium) or rank (13 types; Hard).
- Each action flips one card (position). The observation shows every face-up card and the cards
  flipped in the current turn (the one just flipped included), every other position shows the
  "face-down" value `types`: N components, each one-hot over `types + 1` values (Easy: 156).
- Rewards, with EL = ceil(2n - n / (2n - 1)) (n = N) the episode length:
  - flipping a card that is already face up: -(number of cards flipped this turn, 1 or 2) / EL,
    and the turn ends (popgym shows the flip, then turns the turn's cards back down);
  - the second flip of a turn: +1 / (N / 2) if both cards match (and are different positions;
    they stay face up), else -2 / EL (both are turned back down, after being shown once);
  - the first flip of a turn: 0.
- Terminated when every card is face up; truncated at step EL (104 / 208 / 104). Both may hold
  at once, as in popgym. The first observation shows every card face down.
- `info["success"]` is 1.0 on the step that turns the last pair face up (for the stats wrapper).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

from envs.deck import random_permutation

DECK_SIZE = 52
# popgym.core.deck: card id c has rank c // 4 (13 ranks, 4 suits each) and colour c % 2.
_DECK_TYPES = {"colors": 2, "ranks": 13}


def card_types(num_decks: int, deck_type: str) -> np.ndarray:
    """Type of each card id, as popgym's `Deck.colors_idx` / `Deck.ranks_idx`: int32 [N]."""
    ids = np.arange(DECK_SIZE * num_decks) % DECK_SIZE
    if deck_type == "colors":
        return (ids % 2).astype(np.int32)
    if deck_type == "ranks":
        return (ids // 4).astype(np.int32)
    raise ValueError(f"deck_type must be one of {sorted(_DECK_TYPES)}, got {deck_type!r}")


@struct.dataclass
class EnvState(environment.EnvState):
    deck: jax.Array  # int32 [N]: card id at each position (popgym's deck.idx)
    types: jax.Array  # int32 [N]: face value (colour or rank) at each position
    face_up: jax.Array  # bool [N]: matched cards, face up for good
    first: jax.Array  # int32 []: position flipped first in this turn, -1 if none


@struct.dataclass
class EnvParams(environment.EnvParams):
    max_steps_in_episode: int = 104


class Concentration(environment.Environment[EnvState, EnvParams]):
    """popgym's Concentration with `num_decks` decks matched on `deck_type` (colors | ranks)."""

    episode_metrics = ("success",)
    # popgym: the optimal policy needs the previous action in the observation (see the
    # previous-action wrapper; off by default, as in the SHM paper's runs).
    obs_requires_prev_action = True

    def __init__(self, num_decks: int = 1, deck_type: str = "ranks"):
        super().__init__()
        if not isinstance(num_decks, int) or num_decks < 1:
            raise ValueError(f"num_decks must be a positive int, got {num_decks!r}")
        if deck_type not in _DECK_TYPES:
            raise ValueError(f"deck_type must be one of {sorted(_DECK_TYPES)}, got {deck_type!r}")
        self.num_decks = num_decks
        self.deck_type = deck_type
        self.num_cards = DECK_SIZE * num_decks
        self.num_types = _DECK_TYPES[deck_type]  # also the face-down observation value
        n = self.num_cards
        self.episode_length = math.ceil(2 * n - (n / (2 * n - 1)))
        self.success_reward = 1.0 / (n // 2)
        self.failure_reward = -1.0 / self.episode_length
        self._card_types = jnp.asarray(card_types(num_decks, deck_type))

    @property
    def default_params(self) -> EnvParams:
        return EnvParams(max_steps_in_episode=self.episode_length)

    def _obs(self, types: jax.Array, visible: jax.Array) -> jax.Array:
        """One-hot observation [N * (types + 1)] of the visible positions' face values."""
        values = jnp.where(visible, types, self.num_types)
        return jax.nn.one_hot(values, self.num_types + 1, dtype=jnp.float32).reshape(-1)

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """Shuffle the deck face down; obs [N * (types + 1)] shows every card face down."""
        deck = random_permutation(key, self.num_cards)
        return self.reset_from_deck(deck)

    def reset_from_deck(self, deck: jax.Array) -> tuple[jax.Array, EnvState]:
        """Start an episode with positions holding card ids `deck` (int [N], a permutation)."""
        deck = jnp.asarray(deck, jnp.int32)
        types = self._card_types[deck]
        state = EnvState(
            time=jnp.int32(0),
            deck=deck,
            types=types,
            face_up=jnp.zeros(self.num_cards, bool),
            first=jnp.int32(-1),
        )
        return self._obs(types, state.face_up), state

    def step_env(
        self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict]:
        """Flip the card at position `action` (int in [0, N)); O(N)."""
        a = jnp.asarray(action, jnp.int32)
        positions = jnp.arange(self.num_cards)
        has_first = state.first >= 0
        # Shown this step: the face-up cards and this turn's flips (before they turn back down).
        in_play = (positions == a) | (positions == state.first)
        obs = self._obs(state.types, state.face_up | in_play)

        # The first flip of a turn is never a face-up card (that turn would have ended at once).
        already_up = state.face_up[a]
        first = jnp.maximum(state.first, 0)
        match = has_first & (state.types[first] == state.types[a]) & (first != a)
        pair_found = match & ~already_up
        reward = jnp.where(
            already_up,
            self.failure_reward * jnp.where(has_first, 2.0, 1.0),
            jnp.where(
                has_first, jnp.where(match, self.success_reward, 2.0 * self.failure_reward), 0.0
            ),
        ).astype(jnp.float32)
        face_up = jnp.where(pair_found, state.face_up | in_play, state.face_up)
        terminated = pair_found & jnp.all(face_up)
        turn_goes_on = ~has_first & ~already_up
        state = state.replace(
            time=state.time + 1,
            face_up=face_up,
            first=jnp.where(turn_goes_on, a, -1).astype(jnp.int32),
        )
        info = {"success": terminated.astype(jnp.float32)}
        return obs, state, reward, terminated, info

    @property
    def name(self) -> str:
        return f"Concentration-{self.num_decks}x{self.deck_type}"

    @property
    def num_actions(self) -> int:
        return self.num_cards

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        """One action per card position: Discrete(N)."""
        return spaces.Discrete(self.num_cards)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        """N one-hot face values of `types + 1` entries each (face down = last)."""
        return spaces.Box(0.0, 1.0, (self.num_cards * (self.num_types + 1),), jnp.float32)


REGISTRY = {
    "ConcentrationEasy": functools.partial(Concentration, num_decks=1, deck_type="colors"),
    "ConcentrationMedium": functools.partial(Concentration, num_decks=2, deck_type="colors"),
    "ConcentrationHard": functools.partial(Concentration, num_decks=1, deck_type="ranks"),
}
