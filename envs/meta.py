"""The paper's meta-RL tasks, Wind and Point Robot (sparse), in JAX.

Ports of pomdp-baselines' `envs/meta/toy_navigation/{wind,point_robot}.py` (thaihungle/SHM)
under their `VariBadWrapper`, as the SHM paper runs them (configs `configs/meta/
{wind,point_robot}_{10_190,50_150}`):

- A point on the plane moves by s' = s + a (+ w for Wind). The policy's action lies in
  [-1, 1]^2; it is clipped there and mapped linearly to [-0.1, 0.1]^2 (the wrapper's
  normalisation), so one step moves at most 0.1 per axis.
- Wind: the task is a wind w ~ U[-0.1, 0.1]^2; the goal is fixed at (0, 1); every episode starts
  at (0, 0); reward 1 when ||s' - goal|| <= 0.01, else 0. 1 episode per task.
- Point Robot: the task is a goal (cos a, sin a), a ~ U[0, pi], on the upper unit half-circle;
  each episode starts at s ~ U([-1.5, 1.5] x [-0.5, 1.5]); reward 1 when ||s' - goal|| <= 0.05,
  else 0. 2 episodes per task.
- An episode is 100 steps. A trial is `episodes_per_task` episodes of one task, drawn at the
  trial's start; the gymnax episode (reset, `done`) is the trial, so a memory is reset between
  trials and carried across the episodes of a trial. Never terminated (reaching the goal does
  not end anything); truncated at the trial's end.
- Observation: the position [2]; with more than one episode per task one more value, the
  episode-ended flag: 1.0 on the step that ends an inner episode (it shows that episode's last
  position), 0.0 elsewhere. The next episode starts from a fresh start state that is first
  seen after its first move (as `VariBadWrapper` does).

Task pools: 200 tasks drawn once with numpy's legacy generator seeded 1337, as the original
constructors do, then put in the order of the original learner's train/eval split permutation
(drawn next from the same generator), so that the first `num_train_tasks` tasks of the pool are
the original's training tasks and the rest its evaluation tasks. Training draws tasks from
`params.tasks[task_low:task_high]` = the train tasks; `env.eval_params(params)` switches to the
held-out ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

ACTION_LOW, ACTION_HIGH = -0.1, 0.1  # the inner env's action box


@struct.dataclass
class EnvState(environment.EnvState):
    # `time`: steps taken in the trial (0 .. episodes_per_task * episode_length).
    pos: jax.Array  # float32 [2]: position
    task: jax.Array  # float32 [2]: wind (Wind) or goal (Point Robot) of this trial
    task_index: jax.Array  # int32 []: row of `params.tasks`
    episode_returns: jax.Array  # float32 [episodes_per_task]: return of each inner episode


@struct.dataclass
class EnvParams(environment.EnvParams):
    # max_steps_in_episode: the trial length, episodes_per_task * episode_length.
    tasks: jax.Array | None = None  # float32 [num_tasks, 2]: the pool, train tasks first
    task_low: int = 0  # tasks are drawn uniformly from rows [task_low, task_high)
    task_high: int = 1


def normalize_action(action: jax.Array) -> jax.Array:
    """[-1, 1]^2 policy action -> [-0.1, 0.1]^2 move (clip, then the wrapper's linear map)."""
    a = jnp.clip(jnp.asarray(action, jnp.float32), -1.0, 1.0)
    return jnp.clip(
        ACTION_LOW + (a + 1.0) * 0.5 * (ACTION_HIGH - ACTION_LOW), ACTION_LOW, ACTION_HIGH
    )


class MetaNavigation(environment.Environment[EnvState, EnvParams]):
    """Shared trial logic of Wind and Point Robot; subclasses define the task's physics.

    Args:
        num_train_tasks: N, the first N pool tasks train, the other num_tasks - N evaluate.
        episodes_per_task: inner episodes per trial (memory is kept across them).
        episode_length: steps per inner episode.
        num_tasks: size of the task pool.
        seed: numpy seed of the pool (1337 in the original).
    """

    goal_radius: float
    episode_metrics: tuple[str, ...] = ("return_ep0",)  # set per instance: one per inner episode

    def __init__(
        self,
        num_train_tasks: int,
        episodes_per_task: int,
        episode_length: int = 100,
        num_tasks: int = 200,
        seed: int = 1337,
    ):
        super().__init__()
        for name, value in (
            ("num_tasks", num_tasks),
            ("episodes_per_task", episodes_per_task),
            ("episode_length", episode_length),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(num_train_tasks, int) or not 0 < num_train_tasks < num_tasks:
            raise ValueError(
                f"num_train_tasks must be an int in [1, {num_tasks - 1}] (num_tasks={num_tasks} "
                f"leaves the rest for evaluation), got {num_train_tasks!r}"
            )
        self.num_train_tasks = num_train_tasks
        self.num_tasks = num_tasks
        self.episodes_per_task = episodes_per_task
        self.episode_length = episode_length
        self.seed = seed
        self.pool = np.asarray(self.make_pool(num_tasks, seed), np.float32)  # [num_tasks, 2]
        # Per-inner-episode returns, reported at the trial's end (see the common contract).
        self.episode_metrics = tuple(f"return_ep{i}" for i in range(episodes_per_task))

    # -- task physics, defined by subclasses ---------------------------------------------------
    @staticmethod
    def make_pool(num_tasks: int, seed: int) -> np.ndarray:
        """The task pool [num_tasks, 2] (float64), ordered train tasks first."""
        raise NotImplementedError

    def start_position(self, key: jax.Array) -> jax.Array:
        """Start position [2] of an inner episode."""
        raise NotImplementedError

    def move(self, pos: jax.Array, delta: jax.Array, task: jax.Array) -> jax.Array:
        """Next position [2] after moving by `delta` [2] in `task`."""
        raise NotImplementedError

    def goal(self, task: jax.Array) -> jax.Array:
        """Goal position [2] of `task`."""
        raise NotImplementedError

    # -- gymnax API ----------------------------------------------------------------------------
    @property
    def default_params(self) -> EnvParams:
        """Params that draw the training tasks."""
        return EnvParams(
            max_steps_in_episode=self.episodes_per_task * self.episode_length,
            tasks=jnp.asarray(self.pool),
            task_low=0,
            task_high=self.num_train_tasks,
        )

    def eval_params(self, params: EnvParams) -> EnvParams:
        """`params` switched to drawing only the held-out evaluation tasks (same structure)."""
        return params.replace(task_low=self.num_train_tasks, task_high=self.num_tasks)

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """Draw a task from rows [task_low, task_high) and the first episode's start."""
        key_task, key_start = jax.random.split(key)
        index = jax.random.randint(key_task, (), params.task_low, params.task_high)
        state = EnvState(
            time=jnp.int32(0),
            pos=self.start_position(key_start),
            task=params.tasks[index],
            task_index=index,
            episode_returns=jnp.zeros(self.episodes_per_task, jnp.float32),
        )
        return self._obs(state.pos, jnp.bool_(False)), state

    def step_env(
        self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict]:
        """Move by the normalised `action` [2]; sparse reward; at an inner episode's end show the
        last position with flag 1 and put the agent at a fresh start for the next episode."""
        pos = self.move(state.pos, normalize_action(action), state.task)
        reward = (jnp.linalg.norm(pos - self.goal(state.task)) <= self.goal_radius).astype(
            jnp.float32
        )
        episode = state.time // self.episode_length
        returns = state.episode_returns.at[episode].add(reward)
        time = state.time + 1
        episode_ended = time % self.episode_length == 0
        obs = self._obs(pos, episode_ended)
        next_pos = jnp.where(episode_ended, self.start_position(key), pos)
        state = state.replace(time=time, pos=next_pos, episode_returns=returns)
        info = {name: returns[i] for i, name in enumerate(self.episode_metrics)}
        return obs, state, reward, jnp.bool_(False), info

    def _obs(self, pos: jax.Array, episode_ended: jax.Array) -> jax.Array:
        if self.episodes_per_task == 1:
            return pos
        return jnp.concatenate([pos, episode_ended.astype(jnp.float32)[None]])

    @property
    def num_actions(self) -> int:
        return 2

    def action_space(self, params: EnvParams | None = None) -> spaces.Box:
        """Box(-1, 1, (2,)): the policy's action, mapped to a move in [-0.1, 0.1]^2."""
        return spaces.Box(-1.0, 1.0, (2,), jnp.float32)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        """Box [2] position, plus the episode-ended flag when episodes_per_task > 1."""
        return spaces.Box(-jnp.inf, jnp.inf, (2 + (self.episodes_per_task > 1),), jnp.float32)


class Wind(MetaNavigation):
    """Reach the fixed goal (0, 1) from (0, 0) against a hidden per-task wind (`Wind-v0`)."""

    goal_radius = 0.01
    GOAL = (0.0, 1.0)

    def __init__(self, num_train_tasks: int = 10, episodes_per_task: int = 1, **kwargs):
        super().__init__(num_train_tasks, episodes_per_task, **kwargs)

    @staticmethod
    def make_pool(num_tasks: int, seed: int) -> np.ndarray:
        """Winds ~ U[-0.1, 0.1]^2 (`WindEnv.__init__`), in the learner's split order."""
        rng = np.random.RandomState(seed)
        winds = rng.uniform(-0.1, 0.1, size=(num_tasks, 2))
        return winds[rng.permutation(num_tasks)]

    def start_position(self, key: jax.Array) -> jax.Array:
        return jnp.zeros(2, jnp.float32)

    def move(self, pos: jax.Array, delta: jax.Array, task: jax.Array) -> jax.Array:
        return pos + delta + task

    def goal(self, task: jax.Array) -> jax.Array:
        return jnp.asarray(self.GOAL, jnp.float32)

    @property
    def name(self) -> str:
        return f"Wind-{self.num_train_tasks}-{self.num_tasks - self.num_train_tasks}"


class PointRobot(MetaNavigation):
    """Find a hidden goal on the upper unit half-circle, sparse reward (`PointRobotSparse-v0`)."""

    goal_radius = 0.05
    START_LOW = (-1.5, -0.5)
    START_HIGH = (1.5, 1.5)

    def __init__(self, num_train_tasks: int = 10, episodes_per_task: int = 2, **kwargs):
        super().__init__(num_train_tasks, episodes_per_task, **kwargs)

    @staticmethod
    def make_pool(num_tasks: int, seed: int) -> np.ndarray:
        """Goals at angles ~ U[0, pi], shuffled, in the learner's split order.

        Replays the original's draws from the shared generator: `PointEnv.__init__` draws
        num_tasks dense goals in [-10, 10]^2 (unused here) and one start state,
        `SparsePointEnv.__init__` the angles, a shuffle and another start state; the learner
        then draws the split permutation.
        """
        rng = np.random.RandomState(seed)
        rng.uniform(-10.0, 10.0, size=(num_tasks, 2))
        rng.uniform(size=2)
        angles = rng.uniform(0.0, np.pi, size=num_tasks)
        goals = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        rng.shuffle(goals)
        rng.uniform(size=2)
        return goals[rng.permutation(num_tasks)]

    def start_position(self, key: jax.Array) -> jax.Array:
        return jax.random.uniform(
            key, (2,), minval=jnp.asarray(self.START_LOW), maxval=jnp.asarray(self.START_HIGH)
        )

    def move(self, pos: jax.Array, delta: jax.Array, task: jax.Array) -> jax.Array:
        return pos + delta

    def goal(self, task: jax.Array) -> jax.Array:
        return task

    @property
    def name(self) -> str:
        return f"PointRobot-{self.num_train_tasks}-{self.num_tasks - self.num_train_tasks}"


REGISTRY = {
    f"{cls.__name__}-{n}-{200 - n}": functools.partial(cls, num_train_tasks=n)
    for cls in (Wind, PointRobot)
    for n in (10, 50)
}
