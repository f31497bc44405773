"""MineSweeper (POPGym): clear a hidden minefield from mine counts alone, in JAX.

A rule-for-rule port of `popgym.envs.minesweeper` (popgym 1.0.7):

- An R x C board (4x4 / 6x6 / 8x8) hides M mines (2 / 6 / 10) on a uniform random subset of
  cells (popgym: `choice(R*C, M, replace=False)`); L = R*C - M safe cells.
- Action: click the cell `r * C + c` (popgym's MultiDiscrete (r, c) flattened).
- Observation: one-hot over min(M + 1, 10) values of the number of mines in the 3x3 block
  around the clicked cell, the cell itself included (also when it is a mine); the first
  observation is 0.
- Reward: a new safe cell +1/L; a safe cell clicked before -0.5 / (L - 2); a mine -0.5 - 1/L.
- Terminated on a mine or when all L safe cells have been clicked (the win popjaxrl never
  fires); truncated at step L unless that step terminated (popgym's
  `truncated = timestep == L and not terminated`).
- `info["success"]` is 1.0 on the step that clears the last safe cell (for the stats wrapper).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

from envs.deck import random_permutation

# popgym's difficulty presets: (rows, cols, mines).
LEVELS = {"easy": (4, 4, 2), "medium": (6, 6, 6), "hard": (8, 8, 10)}


def neighbourhoods(rows: int, cols: int) -> np.ndarray:
    """Flat cells of each cell's 3x3 block: int32 [rows*cols, 9]; off-board = rows*cols."""
    out = np.full((rows * cols, 9), rows * cols, np.int32)
    for r in range(rows):
        for c in range(cols):
            k = 0
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= r + dr < rows and 0 <= c + dc < cols:
                        out[r * cols + c, k] = (r + dr) * cols + c + dc
                    k += 1
    return out


@struct.dataclass
class EnvState(environment.EnvState):
    mines: jax.Array  # bool [R*C]
    viewed: jax.Array  # bool [R*C]: safe cells clicked so far
    num_viewed: jax.Array  # int32 []
    terminated: jax.Array  # bool []: the last step hit a mine or cleared the board


@struct.dataclass
class EnvParams(environment.EnvParams):
    max_steps_in_episode: int = 30


class MineSweeper(environment.Environment[EnvState, EnvParams]):
    """popgym's MineSweeper on a `rows` x `cols` board with `num_mines` mines."""

    episode_metrics = ("success",)
    # popgym: the optimal policy needs the previous action in the observation (see the
    # previous-action wrapper; off by default, as in the SHM paper's runs).
    obs_requires_prev_action = True

    def __init__(self, rows: int = 6, cols: int = 6, num_mines: int = 6):
        super().__init__()
        for name, value in (("rows", rows), ("cols", cols), ("num_mines", num_mines)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if rows * cols - num_mines < 3:
            raise ValueError(
                f"num_mines={num_mines} must leave at least 3 safe cells on a {rows}x{cols} "
                "board (popgym's repeat-click penalty divides by safe cells - 2)"
            )
        self.rows, self.cols, self.num_mines = rows, cols, num_mines
        self.num_cells = rows * cols
        self.num_safe = self.num_cells - num_mines  # L, also popgym's episode length
        self.num_obs = min(num_mines + 1, 10)
        self.success_reward = 1.0 / self.num_safe
        self.mine_reward = -0.5 - self.success_reward
        self.repeat_reward = -0.5 / (self.num_safe - 2)
        self._neighbours = jnp.asarray(neighbourhoods(rows, cols))

    @property
    def default_params(self) -> EnvParams:
        return EnvParams(max_steps_in_episode=self.num_safe)

    def sample_mines(self, key: jax.Array) -> jax.Array:
        """A uniform random set of `num_mines` cells: bool [R*C]."""
        # The first M places of a uniform random ranking of the cells.
        return random_permutation(key, self.num_cells) < self.num_mines

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """Lay the mines; obs [min(M+1, 10)] is one-hot(0)."""
        return self.reset_from_mines(self.sample_mines(key))

    def reset_from_mines(self, mines: jax.Array) -> tuple[jax.Array, EnvState]:
        """Start an episode with mines at `mines` (bool [R*C] or [R, C])."""
        mines = jnp.asarray(mines, bool).reshape(self.num_cells)
        state = EnvState(
            time=jnp.int32(0),
            mines=mines,
            viewed=jnp.zeros(self.num_cells, bool),
            num_viewed=jnp.int32(0),
            terminated=jnp.bool_(False),
        )
        return jax.nn.one_hot(0, self.num_obs, dtype=jnp.float32), state

    def step_env(
        self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict]:
        """Click cell `action` = r * C + c; O(1) apart from copying the board."""
        a = jnp.asarray(action, jnp.int32)
        is_mine = state.mines[a]
        seen_before = state.viewed[a]
        new_safe = ~is_mine & ~seen_before
        reward = jnp.where(
            is_mine,
            self.mine_reward,
            jnp.where(seen_before, self.repeat_reward, self.success_reward),
        ).astype(jnp.float32)
        num_viewed = state.num_viewed + new_safe.astype(jnp.int32)
        won = num_viewed == self.num_safe
        terminated = is_mine | won
        count = jnp.sum(jnp.append(state.mines, False)[self._neighbours[a]].astype(jnp.int32))
        obs = jax.nn.one_hot(count, self.num_obs, dtype=jnp.float32)
        state = state.replace(
            time=state.time + 1,
            viewed=state.viewed.at[a].set(seen_before | new_safe),
            num_viewed=num_viewed,
            terminated=terminated,
        )
        info = {"success": won.astype(jnp.float32)}
        return obs, state, reward, terminated, info

    def is_truncated(self, state: EnvState, params: EnvParams) -> jax.Array:
        """popgym: truncated at step L only if that step did not terminate."""
        return (state.time >= params.max_steps_in_episode) & ~state.terminated

    @property
    def name(self) -> str:
        return f"MineSweeper-{self.rows}x{self.cols}-{self.num_mines}"

    @property
    def num_actions(self) -> int:
        return self.num_cells

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        """One action per cell, r * C + c: Discrete(R*C)."""
        return spaces.Discrete(self.num_cells)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        """one-hot(mines in the clicked 3x3 block): Box [min(M+1, 10)]."""
        return spaces.Box(0.0, 1.0, (self.num_obs,), jnp.float32)


REGISTRY = {
    f"MineSweeper{level.capitalize()}": functools.partial(MineSweeper, rows=r, cols=c, num_mines=m)
    for level, (r, c, m) in LEVELS.items()
}
