"""Battleship (POPGym): sink ships on a hidden board from hit/miss feedback alone, in JAX.

A rule-for-rule port of `popgym.envs.battleship` (popgym 1.0.7):

- A B x B board (8 / 10 / 12) holds ships of sizes 2, 3, 3, 4 (12 cells), placed in that order.
  popgym places each ship by rejection: a uniform start cell, a uniform axis and a uniform
  direction, retried until the ship lies on the board and overlaps no earlier ship. Every
  on-board segment arises from exactly two (start, direction) draws, so each ship is uniform
  over the segments still free; this port samples that distribution directly (one uniform
  choice among the free segments per ship, no retry loop).
- Action: the cell `r * B + c` (popgym's MultiDiscrete (r, c) flattened).
- Observation: one-hot(hit) (2 entries), hit = the cell is a ship cell not guessed before;
  the first observation is "no hit".
- Reward: +1/12 for a hit, -1 / (B*B - 12) for anything else (a miss or a repeated guess).
- Terminated after the 12th hit; truncated at step B*B (both may hold at once, as in popgym).
- `info["success"]` is 1.0 on the step that sinks the last ship (for the stats wrapper).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

SHIP_SIZES = (2, 3, 3, 4)


def ship_segments(board_size: int, ship_size: int) -> np.ndarray:
    """Flat cells of every on-board placement of a ship: int32 [num_segments, ship_size].

    Rows first: all vertical placements (axis 0) by top cell, then all horizontal ones.
    """
    b, s = board_size, ship_size
    segments = []
    for r in range(b - s + 1):  # vertical: rows r .. r+s-1
        for c in range(b):
            segments.append([(r + i) * b + c for i in range(s)])
    for r in range(b):  # horizontal: columns c .. c+s-1
        for c in range(b - s + 1):
            segments.append([r * b + c + i for i in range(s)])
    return np.asarray(segments, np.int32)


def _uniform_below(bits: jax.Array, n: jax.Array) -> jax.Array:
    """floor(bits * n / 2^32) for uint32 `bits` and 0 < n < 2^16: uniform in [0, n) up to
    n / 2^32 (multiply-shift, computed in 16-bit halves to stay within uint32)."""
    hi, lo = bits >> 16, bits & 0xFFFF
    return ((hi * n + ((lo * n) >> 16)) >> 16).astype(jnp.int32)


def _nth_true(mask: jax.Array, j: jax.Array, width: int = 16) -> jax.Array:
    """Index of the j-th (0-based) True of bool `mask` [n] (j < mask.sum()).

    Two levels of prefix sums (blocks of `width`, then inside the block): XLA:CPU's cumsum
    costs O(n^2) for n ~ 250 and dominated the reset before.
    """
    pad = (-mask.shape[0]) % width
    blocks = jnp.pad(mask, (0, pad)).reshape(-1, width).astype(jnp.int32)  # [G, width]
    block_sums = blocks.sum(axis=1)  # [G]
    ends = jnp.cumsum(block_sums)  # [G]
    g = jnp.argmax(ends > j)
    inside = jnp.cumsum(blocks[g])  # [width]
    return g * width + jnp.argmax(inside > j - (ends[g] - block_sums[g]))


@struct.dataclass
class EnvState(environment.EnvState):
    board: jax.Array  # bool [B*B]: ship cells
    guesses: jax.Array  # bool [B*B]: cells guessed so far
    hits: jax.Array  # int32 []: ship cells hit so far


@struct.dataclass
class EnvParams(environment.EnvParams):
    max_steps_in_episode: int = 100


class Battleship(environment.Environment[EnvState, EnvParams]):
    """popgym's Battleship on a `board_size` x `board_size` board with ships `ship_sizes`."""

    episode_metrics = ("success",)
    # popgym: the optimal policy needs the previous action in the observation (see the
    # previous-action wrapper; off by default, as in the SHM paper's runs).
    obs_requires_prev_action = True

    def __init__(self, board_size: int = 10, ship_sizes: tuple[int, ...] = SHIP_SIZES):
        super().__init__()
        if not isinstance(board_size, int) or board_size < 1:
            raise ValueError(f"board_size must be a positive int, got {board_size!r}")
        ship_sizes = tuple(int(s) for s in ship_sizes)
        if not ship_sizes or min(ship_sizes) < 1 or max(ship_sizes) > board_size:
            raise ValueError(
                f"ship_sizes must be non-empty sizes in [1, board_size={board_size}], "
                f"got {ship_sizes!r}"
            )
        if sum(ship_sizes) >= board_size**2:
            raise ValueError(
                f"ships {ship_sizes!r} need fewer than board_size**2 = {board_size**2} cells"
            )
        self.board_size = board_size
        self.ship_sizes = ship_sizes
        self.num_cells = board_size**2
        self.needed_hits = sum(ship_sizes)
        self.hit_reward = 1.0 / self.needed_hits
        self.miss_reward = -1.0 / (self.num_cells - self.needed_hits)
        self._segments = [jnp.asarray(ship_segments(board_size, s)) for s in ship_sizes]

    @property
    def default_params(self) -> EnvParams:
        return EnvParams(max_steps_in_episode=self.num_cells)

    def sample_board(self, key: jax.Array) -> jax.Array:
        """popgym's ship placement: bool [B*B] with the ships placed in order, no overlaps.

        Each ship is uniform over the segments that avoid the ships placed before it. Ship
        sets that leave a later ship no room (impossible for popgym's levels) are not handled.
        """
        board = jnp.zeros(self.num_cells, bool)
        bits = jax.random.bits(key, (len(self.ship_sizes),), jnp.uint32)
        for i, segments in enumerate(self._segments):
            free = ~jnp.any(board[segments], axis=1)  # [num_segments]
            j = _uniform_below(bits[i], jnp.sum(free, dtype=jnp.uint32))
            board = board.at[segments[_nth_true(free, j)]].set(True)
        return board

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """Place the ships; obs [2] is "no hit"."""
        return self.reset_from_board(self.sample_board(key))

    def reset_from_board(self, board: jax.Array) -> tuple[jax.Array, EnvState]:
        """Start an episode on `board` (bool [B*B] ship cells, or [B, B])."""
        board = jnp.asarray(board, bool).reshape(self.num_cells)
        state = EnvState(
            time=jnp.int32(0),
            board=board,
            guesses=jnp.zeros(self.num_cells, bool),
            hits=jnp.int32(0),
        )
        return jax.nn.one_hot(0, 2, dtype=jnp.float32), state

    def step_env(
        self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict]:
        """Guess cell `action` = r * B + c; O(1) apart from copying the board."""
        a = jnp.asarray(action, jnp.int32)
        hit = state.board[a] & ~state.guesses[a]
        hits = state.hits + hit.astype(jnp.int32)
        reward = jnp.where(hit, self.hit_reward, self.miss_reward).astype(jnp.float32)
        terminated = hits == self.needed_hits
        state = state.replace(time=state.time + 1, guesses=state.guesses.at[a].set(True), hits=hits)
        obs = jax.nn.one_hot(hit.astype(jnp.int32), 2, dtype=jnp.float32)
        info = {"success": terminated.astype(jnp.float32)}
        return obs, state, reward, terminated, info

    @property
    def name(self) -> str:
        return f"Battleship-{self.board_size}"

    @property
    def num_actions(self) -> int:
        return self.num_cells

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        """One action per cell, r * B + c: Discrete(B*B)."""
        return spaces.Discrete(self.num_cells)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        """one-hot(hit): Box [2]."""
        return spaces.Box(0.0, 1.0, (2,), jnp.float32)


REGISTRY = {
    "BattleshipEasy": functools.partial(Battleship, board_size=8),
    "BattleshipMedium": functools.partial(Battleship, board_size=10),
    "BattleshipHard": functools.partial(Battleship, board_size=12),
}
