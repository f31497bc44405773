"""Visual Match and Key-to-Door: the DeepMind TVT credit-assignment gridworlds in JAX.

The SHM paper runs these through Memory-RL / pomdp-baselines (thaihungle/SHM
`pomdp-baselines/envs/credit_assign/key_to_door/`, ids `VisualMatch-SR-v0` and `KeytoDoor-SR-v0`),
which wrap DeepMind's pycolab games. This module is a rule-for-rule port of those games:

- Three phases ("chapters" of a pycolab `Story`), each a 7x11 grid with its own player start.
  A phase of `n` frames takes exactly `n` actions (pycolab's `TimerSprite` ends the chapter when
  the chapter's frame counter reaches `n`; frame 0 is the chapter's first observation). The action
  that ends a phase is answered with the NEXT phase's first frame (pycolab's `Story` discards a
  chapter's last frame); only the final phase's last frame is shown. Episode length =
  explore + distractor + reward actions.
- Visual Match (passive): explore 15 frames in a one-cell room; one of its 8 wall cells (uniform)
  shows the target colour. Distractor D frames. Reward 10 frames: three doors at the top of a room
  (`b`, `c`, `e` at row 1, columns 2, 5, 8); stepping on any door removes all three, only the
  target's door pays `final_reward`. The three door colours are pure red, green and blue (hues 0,
  1/3, 2/3) in an order the original draws once per game object (i.e. per env instance); here it
  is `EnvParams.symbol_hues` (b, c, e -> hue index), or drawn per episode with
  `EnvParams.shuffle_colours=True`. The target symbol is drawn per episode.
- Key-to-Door: explore 10 frames: key on one of the 10 `k` cells, player on one of the 10 `+`
  cells (uniform); walking onto the key picks it up, and a white indicator replaces the top wall
  cell (row 0, column 5) for that one frame. Distractor D frames. Reward 3 frames: a door two
  cells above the player; the door is a wall without the key; walking onto it with the key pays
  `final_reward` once (the door stays drawn on top of the player).
- Distractor (both): a 7x11 walled room, player starts at (5, 5); `num_apples` (10) of its 22 apple
  cells are kept per episode; eating an apple pays `apple_reward` (1.0); an apple eaten at frame f
  reappears at frame f + 21 (pycolab: `frame > last_pickup + respawn_every`, respawn_every 20).
- Actions: 0 = north, 1 = south, 2 = west, 3 = east (pycolab's ACTION_NORTH..EAST); walls and
  the board's edge block a move.
- Observation: the 5x5 window centred on the player (pycolab `ScrollingCropper`, rows = cols = 5,
  scroll margins (2, 2): with those margins the window always re-centres on the player), cells
  outside the board shown as background. Each cell is its colour on pycolab's 0..999 scale mapped
  to uint8 as `uint8(c * 255 / 1000)` (truncation, as the original `env.py`), transposed to
  channel-first (3, 5, 5) and flattened to 75 values. **The values are returned as float32 but
  are the raw 0..255 pixel values** (the original's uint8 observation; the project's contract
  wants float32 vectors). The env declares them (`pixel_observations = True`), so `VecEnv`
  reports them in `pixel_dims` and train.py's network scales them to [0, 1].
- `info["success"]` is 1.0 when the reward phase paid a positive reward (the original's
  `last_phase_reward() > 0`); it is meaningful at the step that ends the episode.

Returns, measured with `oracle_action` (a scripted policy reading the state: greedy apple
collection that also waits for respawns, then the right door / the key) over 256 episodes by
`python bench/credit_assign.py`: apples 37.1 ± 3.1 / 91.6 ± 8.1 / 182.7 ± 16.3 for D = 100 / 250
/ 500 (each of the 10 apples can be eaten every ~22 frames), so the scripted optimum return is
about 47 / 102 / 193, success 1.0, for both games (same apple rules). A uniform random policy
gets 9 / 22 / 44 with success 0.01-0.03 (Visual Match) and 0.0 (Key-to-Door). The authors'
registration comment ("~23 apples + 5 = 28") predates the final reward of 10 and undercounts the
respawning apples; the greedy oracle is a lower bound on the true optimum.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

# ---------------------------------------------------------------------------------------------
# Game data (the original's grids and colours).

NORTH, SOUTH, WEST, EAST = 0, 1, 2, 3
_MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], np.int32)  # [4, (drow, dcol)]

# Colour ids (rows of _PALETTE).
BACKGROUND, BORDER, PLAYER, KEY, DOOR, APPLE, INDICATOR, RED, GREEN, BLUE = range(10)
_COLOURS_1000 = np.array(
    [
        (800, 800, 800),  # background ' '
        (100, 100, 100),  # border '#'
        (898, 584, 430),  # player '+'
        (627, 321, 176),  # key 'k'
        (529, 808, 922),  # door 'd'
        (550, 700, 0),  # apple 'a'
        (1000, 1000, 1000),  # Key-to-Door's indicator 'i'
        (1000, 0, 0),  # hue 0
        (0, 1000, 0),  # hue 1/3
        (0, 0, 1000),  # hue 2/3
    ],
    np.float64,
)
# [10, 3] uint8 values, exactly the original env.py's conversion (float c*255/1000 cast to uint8).
PALETTE = (_COLOURS_1000 * 255 / 1000).astype(np.uint8)

ROWS, COLS, VIEW = 7, 11, 5
_PAD = VIEW // 2

DISTRACTOR_GRID = (
    "###########",
    "#a a a a a#",
    "# a a a a #",
    "#a a a a a#",
    "# a a a a #",
    "#a a + a a#",
    "###########",
)
VM_EXPLORE_GRID = (  # the passive explore room: the ring of `p` cells is walls but one
    "           ",
    "    ppp    ",
    "    p+p    ",
    "    ppp    ",
    "           ",
    "           ",
    "           ",
)
VM_REWARD_GRID = (
    "###########",
    "# b  c  e #",
    "#         #",
    "#         #",
    "####   ####",
    "   # + #   ",
    "   #####   ",
)
KTD_EXPLORE_GRID = (
    "  #######  ",
    "  #kkkkk#  ",
    "  #kkkkk#  ",
    "  ##   ##  ",
    "  #+++++#  ",
    "  #+++++#  ",
    "  #######  ",
)
KTD_REWARD_GRID = (
    "           ",
    "   ##d##   ",
    "   #   #   ",
    "   # + #   ",
    "   #   #   ",
    "   #####   ",
    "           ",
)
KTD_INDICATOR_CELL = (0, 5)
VM_PHASES = (15, 10)  # (explore, reward) frames; the distractor length is the env's argument
KTD_PHASES = (10, 3)


def _cells(grid: tuple[str, ...], char: str) -> np.ndarray:
    """[n, 2] int32 (row, col) of `char` in `grid`, row-major (numpy argwhere order)."""
    return np.argwhere(np.array([list(row) for row in grid]) == char).astype(np.int32)


def _walls(grid: tuple[str, ...], wall_chars: str = "#") -> np.ndarray:
    """[ROWS, COLS] bool: cells a move cannot enter."""
    return np.isin(np.array([list(row) for row in grid]), list(wall_chars))


APPLE_CELLS = _cells(DISTRACTOR_GRID, "a")  # [22, 2]
_DISTRACTOR_START = _cells(DISTRACTOR_GRID, "+")[0]


def _apple_index() -> np.ndarray:
    """[ROWS + 4, COLS + 4] int32: index into APPLE_CELLS of each padded cell, -1 elsewhere."""
    index = -np.ones((ROWS + 2 * _PAD, COLS + 2 * _PAD), np.int32)
    index[APPLE_CELLS[:, 0] + _PAD, APPLE_CELLS[:, 1] + _PAD] = np.arange(len(APPLE_CELLS))
    return index


_APPLE_INDEX = _apple_index()


def _padded_base(walls: np.ndarray) -> np.ndarray:
    """[ROWS + 4, COLS + 4] int32 colour ids of the static walls, padded with background."""
    base = np.full((ROWS + 2 * _PAD, COLS + 2 * _PAD), BACKGROUND, np.int32)
    base[_PAD : _PAD + ROWS, _PAD : _PAD + COLS] = np.where(walls, BORDER, BACKGROUND)
    return base


# ---------------------------------------------------------------------------------------------
# State and params.


@struct.dataclass
class EnvParams(environment.EnvParams):
    """Traced settings (defaults = the SHM registrations `VisualMatch-SR-v0`, `KeytoDoor-SR-v0`).

    max_steps_in_episode: set by the env to explore + distractor + reward frames.
    apple_reward: reward per apple (the registrations fix it to 1.0).
    final_reward: reward of the right door (10.0).
    respawn_every: an apple eaten at frame f is back at frame f + respawn_every + 1; 0 = never.
    symbol_hues: Visual Match only: hue index (0 red, 1 green, 2 blue) of doors b, c, e.
    shuffle_colours: Visual Match only: draw `symbol_hues` per episode instead.
    """

    max_steps_in_episode: int = 125
    apple_reward: float = 1.0
    final_reward: float = 10.0
    respawn_every: int = 20
    symbol_hues: tuple[int, int, int] = (0, 1, 2)
    shuffle_colours: bool = False


@struct.dataclass
class EnvState(environment.EnvState):
    """State shared by both games. `time` counts actions taken in the episode.

    pos: int32[2] player (row, col) on the current phase's grid.
    apples: bool[22] apple present at APPLE_CELLS[i] (the distractor phase's drape).
    apple_eaten_at: int32[22] distractor frame of the last pickup; 2**30 if never, -1 if the
        cell holds no apple this episode.
    phase_reward: float32 reward collected in the reward phase so far.
    """

    time: int
    pos: jax.Array
    apples: jax.Array
    apple_eaten_at: jax.Array
    phase_reward: jax.Array


@struct.dataclass
class VisualMatchState(EnvState):
    """target: int32 symbol (0 b, 1 c, 2 e); cue_cell: int32 index into the 8 ring cells that
    shows the target colour; door_colours: int32[3] colour ids of b, c, e; doors_visible: bool."""

    target: jax.Array
    cue_cell: jax.Array
    door_colours: jax.Array
    doors_visible: jax.Array


@struct.dataclass
class KeyToDoorState(EnvState):
    """key_cell: int32 index into the 10 key cells; key_picked: bool; pickup_frame: int32
    explore frame of the pickup (-1 before); door_opened: bool (the key is spent)."""

    key_cell: jax.Array
    key_picked: jax.Array
    pickup_frame: jax.Array
    door_opened: jax.Array


_NEVER = 2**30


# ---------------------------------------------------------------------------------------------
# The shared engine.


def _toward(pos: jax.Array, target: jax.Array) -> jax.Array:
    """Action moving `pos` one cell toward `target`: vertical first; north when there."""
    dr, dc = target[0] - pos[0], target[1] - pos[1]
    vertical = jnp.where(dr < 0, NORTH, SOUTH)
    horizontal = jnp.where(dc < 0, WEST, EAST)
    return jnp.where(dr != 0, vertical, jnp.where(dc != 0, horizontal, NORTH))


class _CreditAssignEnv(environment.Environment):
    """Phases, movement, apples and the egocentric crop shared by both games.

    Subclasses provide the explore/reward grids and the game-specific `_sprites`,
    `_explore_update`, `_reward_update` and layout sampling.
    """

    episode_metrics = ("success",)
    pixel_observations = True  # raw 0..255 values in float32: VecEnv.pixel_dims, the network scales
    _explore_grid: tuple[str, ...]
    _reward_grid: tuple[str, ...]
    _phases: tuple[int, int]
    _explore_walls: str = "#"

    def __init__(self, distractor_len: int = 100, num_apples: int = 10):
        if not isinstance(distractor_len, int) or distractor_len < 1:
            raise ValueError(f"distractor_len must be an int >= 1, got {distractor_len!r}")
        if not isinstance(num_apples, int) or not 0 <= num_apples <= len(APPLE_CELLS):
            raise ValueError(
                f"num_apples must be an int in [0, {len(APPLE_CELLS)}], got {num_apples!r}"
            )
        super().__init__()
        self.distractor_len = distractor_len
        self.num_apples = num_apples
        explore, reward = self._phases
        self.phase_lengths = (explore, distractor_len, reward)
        self.episode_len = explore + distractor_len + reward
        walls = np.stack(
            [
                _walls(self._explore_grid, self._explore_walls),
                _walls(DISTRACTOR_GRID),
                _walls(self._reward_grid),
            ]
        )
        self._wall_np = walls  # [3, ROWS, COLS] bool
        self._base_np = np.stack([_padded_base(w) for w in walls])  # [3, ROWS+4, COLS+4]
        self._starts_np = np.stack(
            [
                _cells(self._explore_grid, "+")[0],
                _DISTRACTOR_START,
                _cells(self._reward_grid, "+")[0],
            ]
        )  # [3, 2]

    # -- gymnax API -------------------------------------------------------------------------

    @property
    def default_params(self) -> EnvParams:
        return EnvParams(max_steps_in_episode=self.episode_len)

    @property
    def num_actions(self) -> int:
        return 4

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        """4 moves: 0 north, 1 south, 2 west, 3 east."""
        return spaces.Discrete(4)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        """[75] float32 pixel values 0..255 of the (3, 5, 5) channel-first egocentric crop."""
        return spaces.Box(0.0, 255.0, (3 * VIEW * VIEW,), jnp.float32)

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """Draw the episode's layout; the observation is the explore phase's frame 0."""
        k_apples, k_game = jax.random.split(key)
        kept = jax.random.permutation(k_apples, len(APPLE_CELLS)) < self.num_apples
        state = self._initial_state(k_game, kept, params)
        return self.get_obs(state, params), state

    def step_env(
        self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict[str, Any]]:
        """One pycolab frame: move, game updates in the original's update order, phase timer."""
        del key  # the dynamics are deterministic; all randomness is drawn at reset
        phase, frame = self.phase_and_frame(state.time)
        frame = frame + 1  # this action produces frame `frame` of phase `phase`
        pos = self._move(state, phase, jnp.asarray(action, jnp.int32))
        state = state.replace(pos=pos)
        state, apple_reward = self._apple_update(state, phase, frame, params)
        state, explore_reward = self._explore_update(state, phase == 0, frame, params)
        state, final_reward = self._reward_update(state, phase == 2, params)
        reward = apple_reward + explore_reward + final_reward
        state = state.replace(
            phase_reward=state.phase_reward + jnp.where(phase == 2, reward, 0.0),
            time=state.time + 1,
        )
        # Timer: the phase's last frame hands over to the next phase's frame 0 (fresh start).
        lengths = jnp.asarray(self.phase_lengths, jnp.int32)
        handover = (frame >= lengths[phase]) & (phase < 2)
        start = jnp.asarray(self._starts_np)[jnp.minimum(phase + 1, 2)]
        state = state.replace(pos=jnp.where(handover, start, state.pos))
        terminated = state.time >= self.episode_len
        info = {"success": (state.phase_reward > 0).astype(jnp.float32)}
        return self.get_obs(state, params), state, reward.astype(jnp.float32), terminated, info

    def get_obs(self, state: EnvState, params: EnvParams | None = None, key=None) -> jax.Array:
        """[75] float32: the 5x5 crop around the player as uint8 colour values, (3, 5, 5) flat."""
        phase, frame = self.phase_and_frame(state.time)
        row, col = state.pos[0], state.pos[1]
        # Colour ids of the 5x5 window (top-left corner at pos - 2; padded arrays shift by +2).
        ids = jax.lax.dynamic_slice(jnp.asarray(self._base_np), (phase, row, col), (1, VIEW, VIEW))
        ids = ids[0]  # [5, 5]
        rr = row - _PAD + jnp.arange(VIEW)[:, None]  # [5, 1] board rows of the window
        cc = col - _PAD + jnp.arange(VIEW)[None, :]  # [1, 5] board cols of the window
        apple_idx = jax.lax.dynamic_slice(jnp.asarray(_APPLE_INDEX), (row, col), (VIEW, VIEW))
        apple_on = (apple_idx >= 0) & state.apples[jnp.maximum(apple_idx, 0)] & (phase == 1)
        # Paint back to front (the original's z-order).
        layers = self._sprites(state, phase, frame)
        ids = self._paint(ids, rr, cc, layers["under_apples"])
        ids = jnp.where(apple_on, APPLE, ids)
        ids = self._paint(ids, rr, cc, layers["under_player"])
        ids = jnp.where((rr == row) & (cc == col), PLAYER, ids)
        ids = self._paint(ids, rr, cc, layers["over_player"])
        pixels = jnp.asarray(PALETTE, jnp.float32)[ids]  # [5, 5, 3]
        return jnp.transpose(pixels, (2, 0, 1)).reshape(-1)

    def is_terminated(self, state: EnvState, params: EnvParams) -> jax.Array:
        """The episode ends with the reward phase's timer; there is no other terminal event."""
        return state.time >= self.episode_len

    # -- shared mechanics -------------------------------------------------------------------

    def phase_and_frame(self, time: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Phase (0 explore, 1 distractor, 2 reward) of the observation after `time` actions,
        and its frame within the phase."""
        explore, distractor, _ = self.phase_lengths
        phase = (time >= explore).astype(jnp.int32) + (time >= explore + distractor)
        start = jnp.where(phase == 0, 0, jnp.where(phase == 1, explore, explore + distractor))
        return phase, time - start

    def _blocked(self, state: EnvState, phase: jax.Array, target: jax.Array) -> jax.Array:
        """Extra game-specific obstacles (Key-to-Door's locked door)."""
        return jnp.zeros((), bool)

    def _move(self, state: EnvState, phase: jax.Array, action: jax.Array) -> jax.Array:
        """pycolab MazeWalker: step unless the target is off the board or impassable."""
        target = state.pos + jnp.asarray(_MOVES)[action]
        inside = (target >= 0).all() & (target[0] < ROWS) & (target[1] < COLS)
        r, c = jnp.clip(target[0], 0, ROWS - 1), jnp.clip(target[1], 0, COLS - 1)
        free = (
            inside & ~jnp.asarray(self._wall_np)[phase, r, c] & ~self._blocked(state, phase, target)
        )
        return jnp.where(free, target, state.pos)

    def _apple_update(self, state, phase, frame, params):
        """The original AppleDrape: eat under the player, then respawn old pickups."""
        active = phase == 1
        eat = active & state.apples & (jnp.asarray(APPLE_CELLS) == state.pos).all(-1)  # [22]
        eaten_at = jnp.where(eat, frame, state.apple_eaten_at)
        respawn = (
            active
            & (params.respawn_every > 0)
            & (eaten_at >= 0)
            & (frame > eaten_at + params.respawn_every)
        )
        apples = (state.apples & ~eat) | respawn
        reward = params.apple_reward * eat.sum()
        return state.replace(apples=apples, apple_eaten_at=eaten_at), reward

    @staticmethod
    def _paint(ids, rr, cc, layers):
        """Paint (row, col, colour_id, visible) sprites onto the [5, 5] window, in order."""
        for row, col, colour, visible in layers:
            ids = jnp.where((rr == row) & (cc == col) & visible, colour, ids)
        return ids

    def _base_state(self, kept: jax.Array) -> dict[str, Any]:
        return dict(
            time=jnp.zeros((), jnp.int32),
            pos=jnp.asarray(self._starts_np[0]),
            apples=kept,
            apple_eaten_at=jnp.where(kept, _NEVER, -1).astype(jnp.int32),
            phase_reward=jnp.zeros((), jnp.float32),
        )

    def _apple_action(self, state: EnvState, params: EnvParams) -> jax.Array:
        """Oracle distractor move: to the kept apple reachable soonest, max(distance, respawn
        wait); present apples wait 0. The room has no inner walls, so distance is Manhattan."""
        _, frame = self.phase_and_frame(state.time)
        cells = jnp.asarray(APPLE_CELLS)
        dist = jnp.abs(cells - state.pos).sum(-1)
        # An apple eaten at frame f is back at frame f + respawn_every + 1 and edible from the
        # frame after (eating is checked before respawning within a frame).
        wait = state.apple_eaten_at + params.respawn_every + 2 - frame
        wait = jnp.where(state.apples, 0, jnp.maximum(wait, 0))
        usable = state.apples | ((state.apple_eaten_at >= 0) & (params.respawn_every > 0))
        score = jnp.where(usable, jnp.maximum(dist, wait) * 64 + dist, _NEVER)
        return _toward(state.pos, cells[jnp.argmin(score)])

    # -- per game ---------------------------------------------------------------------------

    def _initial_state(self, key, kept, params) -> EnvState:
        raise NotImplementedError

    def _sprites(self, state, phase, frame) -> dict[str, list]:
        raise NotImplementedError

    def _explore_update(self, state, active, frame, params):
        return state, jnp.zeros((), jnp.float32)

    def _reward_update(self, state, active, params):
        raise NotImplementedError


VM_CUE_CELLS = _cells(VM_EXPLORE_GRID, "p")  # [8, 2] ring cells; one shows the target colour
VM_DOOR_CELLS = np.concatenate([_cells(VM_REWARD_GRID, s) for s in "bce"])  # [3, 2]


class VisualMatch(_CreditAssignEnv):
    """Visual Match (passive): remember the colour seen in the explore phase, pick its door.

    Phases: explore 15, distractor `distractor_len` (100 in the default registration, 250 and
    500 in the SHM paper), reward 10. See the module docstring for the rules and encoding.
    """

    _explore_grid = VM_EXPLORE_GRID
    _reward_grid = VM_REWARD_GRID
    _phases = VM_PHASES
    _explore_walls = "#p"  # the cue cell is an impassable sprite; the rest of the ring is wall

    @property
    def name(self) -> str:
        return f"VisualMatch-{self.distractor_len}"

    def init_state(
        self, target: int, cue_cell: int, kept: jax.Array, params: EnvParams
    ) -> VisualMatchState:
        """State at frame 0 for an explicit layout (target symbol 0..2 = b, c, e; cue_cell 0..7
        into VM_CUE_CELLS; kept: bool[22] apples kept), with door colours from params."""
        hues = jnp.asarray(params.symbol_hues, jnp.int32)
        return VisualMatchState(
            **self._base_state(jnp.asarray(kept, bool)),
            target=jnp.asarray(target, jnp.int32),
            cue_cell=jnp.asarray(cue_cell, jnp.int32),
            door_colours=RED + hues,
            doors_visible=jnp.ones((), bool),
        )

    def _initial_state(self, key, kept, params) -> VisualMatchState:
        k_target, k_cue, k_colour = jax.random.split(key, 3)
        state = self.init_state(
            jax.random.randint(k_target, (), 0, 3),
            jax.random.randint(k_cue, (), 0, len(VM_CUE_CELLS)),
            kept,
            params,
        )
        shuffled = RED + jax.random.permutation(k_colour, 3).astype(jnp.int32)
        return state.replace(
            door_colours=jnp.where(params.shuffle_colours, shuffled, state.door_colours)
        )

    def _sprites(self, state, phase, frame):
        cue = jnp.asarray(VM_CUE_CELLS)[state.cue_cell]
        visible = state.doors_visible & (phase == 2)
        doors = [
            (VM_DOOR_CELLS[i, 0], VM_DOOR_CELLS[i, 1], state.door_colours[i], visible)
            for i in range(3)
        ]
        return {
            "under_apples": [(cue[0], cue[1], state.door_colours[state.target], phase == 0)],
            "under_player": [],
            "over_player": doors,  # z-order [player, b, c, e]
        }

    def oracle_action(
        self, state: VisualMatchState, params: EnvParams, right: jax.Array = True
    ) -> jax.Array:
        """Scripted policy reading the state: collect apples, then walk to the target's door
        (`right`) or to the next door (`right=False`, always wrong). Used to measure returns."""
        door = jnp.asarray(VM_DOOR_CELLS)[(state.target + 1 - jnp.asarray(right, jnp.int32)) % 3]
        row, col = state.pos[0], state.pos[1]
        # Leave the start corridor first, then go sideways in row 3 (not past another door).
        sideways = jnp.where(col < door[1], EAST, WEST)
        to_door = jnp.where(row > 3, NORTH, jnp.where(col != door[1], sideways, NORTH))
        phase, _ = self.phase_and_frame(state.time)
        apples = self._apple_action(state, params)
        return jnp.where(phase == 1, apples, jnp.where(phase == 2, to_door, NORTH))

    def _reward_update(self, state, active, params):
        on_door = (jnp.asarray(VM_DOOR_CELLS) == state.pos).all(-1)  # [3]
        touch = active & state.doors_visible & on_door.any()
        right = touch & on_door[state.target]
        reward = jnp.where(right, params.final_reward, 0.0)
        return state.replace(doors_visible=state.doors_visible & ~touch), reward


KTD_KEY_CELLS = _cells(KTD_EXPLORE_GRID, "k")  # [10, 2]
KTD_START_CELLS = _cells(KTD_EXPLORE_GRID, "+")  # [10, 2]
KTD_DOOR_CELL = _cells(KTD_REWARD_GRID, "d")[0]


class KeyToDoor(_CreditAssignEnv):
    """Key-to-Door: pick up the key in the explore phase, open the door in the reward phase.

    Phases: explore 10, distractor `distractor_len` (100 by default; 250 and 500 in the SHM
    paper), reward 3. See the module docstring for the rules and encoding.
    """

    _explore_grid = KTD_EXPLORE_GRID
    _reward_grid = KTD_REWARD_GRID
    _phases = KTD_PHASES

    @property
    def name(self) -> str:
        return f"KeyToDoor-{self.distractor_len}"

    def init_state(
        self, key_cell: int, start_cell: int, kept: jax.Array, params: EnvParams
    ) -> KeyToDoorState:
        """State at frame 0 for an explicit layout (key_cell 0..9 into KTD_KEY_CELLS, start_cell
        0..9 into KTD_START_CELLS, kept: bool[22] apples kept)."""
        base = self._base_state(jnp.asarray(kept, bool))
        base["pos"] = jnp.asarray(KTD_START_CELLS)[start_cell]
        return KeyToDoorState(
            **base,
            key_cell=jnp.asarray(key_cell, jnp.int32),
            key_picked=jnp.zeros((), bool),
            pickup_frame=-jnp.ones((), jnp.int32),
            door_opened=jnp.zeros((), bool),
        )

    def _initial_state(self, key, kept, params) -> KeyToDoorState:
        k_key, k_start = jax.random.split(key)
        return self.init_state(
            jax.random.randint(k_key, (), 0, len(KTD_KEY_CELLS)),
            jax.random.randint(k_start, (), 0, len(KTD_START_CELLS)),
            kept,
            params,
        )

    def oracle_action(
        self, state: KeyToDoorState, params: EnvParams, take_key: jax.Array = True
    ) -> jax.Array:
        """Scripted policy reading the state: fetch the key (or, `take_key=False`, stay in the
        bottom rows), collect apples, then walk north to the door. Used to measure returns."""
        key = jnp.asarray(KTD_KEY_CELLS)[state.key_cell]
        row, col = state.pos[0], state.pos[1]
        through_gap = jnp.where(col < 4, EAST, jnp.where(col > 6, WEST, NORTH))  # gap: cols 4-6
        in_key_rows = jnp.where(col != key[1], _toward(state.pos, key.at[0].set(row)), NORTH)
        fetch = jnp.where(state.key_picked, SOUTH, jnp.where(row > 2, through_gap, in_key_rows))
        fetch = jnp.where((state.pos == key).all(), SOUTH, fetch)
        explore = jnp.where(take_key, fetch, SOUTH)
        phase, _ = self.phase_and_frame(state.time)
        apples = self._apple_action(state, params)
        return jnp.where(phase == 0, explore, jnp.where(phase == 1, apples, NORTH))

    def _blocked(self, state, phase, target):
        # The door is impassable until the key has been picked up (it then stays open).
        return (phase == 2) & (target == jnp.asarray(KTD_DOOR_CELL)).all() & ~state.key_picked

    def _sprites(self, state, phase, frame):
        key = jnp.asarray(KTD_KEY_CELLS)[state.key_cell]
        explore = phase == 0
        return {
            "under_apples": [
                (key[0], key[1], KEY, explore & ~state.key_picked),
                (*KTD_INDICATOR_CELL, INDICATOR, explore & (frame == state.pickup_frame)),
            ],
            "under_player": [],
            "over_player": [(KTD_DOOR_CELL[0], KTD_DOOR_CELL[1], DOOR, phase == 2)],
        }

    def _explore_update(self, state, active, frame, params):
        key = jnp.asarray(KTD_KEY_CELLS)[state.key_cell]
        pick = active & ~state.key_picked & (state.pos == key).all()
        state = state.replace(
            key_picked=state.key_picked | pick,
            pickup_frame=jnp.where(pick, frame, state.pickup_frame),
        )
        return state, jnp.zeros((), jnp.float32)

    def _reward_update(self, state, active, params):
        has_key = state.key_picked & ~state.door_opened
        open_ = active & has_key & (state.pos == jnp.asarray(KTD_DOOR_CELL)).all()
        reward = jnp.where(open_, params.final_reward, 0.0)
        return state.replace(door_opened=state.door_opened | open_), reward


REGISTRY = {
    "VisualMatch": VisualMatch,
    "KeyToDoor": KeyToDoor,
    **{
        f"VisualMatch-{d}": functools.partial(VisualMatch, distractor_len=d)
        for d in (100, 250, 500)
    },
    **{f"KeyToDoor-{d}": functools.partial(KeyToDoor, distractor_len=d) for d in (100, 250, 500)},
}
