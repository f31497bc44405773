"""The training vector env: batched auto-reset, episode statistics, optional previous action.

gymnax 1.0.1's `Environment.step` computes a full `reset_env` for every env on every step and then
selects; for card games that reset (a fresh permutation per env) dominates the cost. `VecEnv`
instead resets only what finished (`envs.md`, "optimistic reset"), exactly:

- no env finished: no reset is computed (`lax.switch` branch 0);
- at most `num_resets` finished (k, default max(1, N // 16)): k fresh resets are computed and
  scattered to the finished envs by their rank among them, so each gets its own fresh state;
- more finished (fixed-length card games end all at once): one full batched reset.

Every finished env gets an independent fresh reset, so episodes have the same distribution as
through gymnax's `step` (tests/envs/test_core.py checks it). Under an outer `jax.vmap` (several
seeds in one program) XLA turns the switch into a select and computes every branch, so the
saving applies to single-seed programs and to seeds sharded across devices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import spaces


@struct.dataclass
class VecEnvState:
    env_state: Any  # the env's own state, batched [N, ...]
    prev_action: jax.Array  # [N, action_dim] one-hot (Discrete) or raw (Box) previous action
    first: jax.Array  # [N] bool, True at the first step of an episode
    episode_returns: jax.Array  # [N] running return of the current episode
    episode_lengths: jax.Array  # [N]
    returned_episode_returns: jax.Array  # [N] the last finished episode's return
    returned_episode_lengths: jax.Array  # [N]
    returned_metrics: dict  # name -> [N], the env's episode_metrics at its last finished episode


def _action_dim(space) -> int:
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    if isinstance(space, spaces.Box):
        return int(jnp.prod(jnp.asarray(space.shape)))
    raise ValueError(f"VecEnv supports Discrete and Box action spaces; got {type(space).__name__}")


class VecEnv:
    """`num_envs` copies of `env` stepped together with auto-reset and episode statistics.

    `reset(key) -> (obs [N, obs_dim], state)`; `step(key, state, action [N] or [N, A]) ->
    (obs, state, reward [N], done [N], info)`, done = terminated | truncated, info with [N]
    arrays `terminated`, `truncated`, `returned_episode`, `returned_episode_returns`,
    `returned_episode_lengths` (gymnax LogWrapper names) and `returned_episode_<m>` for each name
    in `env.episode_metrics`. With `prev_action=True` the observation gets the previous action
    (one-hot for Discrete, zeros at an episode's first step) and a first-step flag appended.

    `pixel_dims`: how many leading observation components are 0..255 pixel values, which the
    network scales to [0, 1]. An env declares pixel observations with `pixel_observations =
    True` (its float32 observations hold raw pixel values); a uint8 observation space counts
    as pixels too.
    """

    def __init__(self, env, params, num_envs: int, prev_action: bool = False, num_resets=None):
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int; got {num_envs!r}")
        self.env, self.params, self.num_envs = env, params, num_envs
        self.prev_action = prev_action
        self.num_resets = num_resets or max(1, num_envs // 16)
        if not 1 <= self.num_resets <= num_envs:
            raise ValueError(f"num_resets must be in [1, {num_envs}]; got {num_resets}")
        self.action_space = env.action_space(params)
        self.action_dim = _action_dim(self.action_space)
        self.discrete = isinstance(self.action_space, spaces.Discrete)
        self.metrics = tuple(getattr(env, "episode_metrics", ()))
        obs_space = env.observation_space(params)
        base = int(jnp.prod(jnp.asarray(obs_space.shape)))
        pixels = getattr(env, "pixel_observations", False) or obs_space.dtype == jnp.uint8
        self.pixel_dims = base if pixels else 0
        self.obs_dim = base + (self.action_dim + 1 if prev_action else 0)
        self.observation_space = spaces.Box(-jnp.inf, jnp.inf, (self.obs_dim,), jnp.float32)

    # -- pieces ------------------------------------------------------------------------------
    def _reset_envs(self, key, n):
        obs, state = jax.vmap(self.env.reset_env, in_axes=(0, None))(
            jax.random.split(key, n), self.params
        )
        return obs.reshape(n, -1).astype(jnp.float32), state

    def _observe(self, obs, prev_action, first):
        if not self.prev_action:
            return obs
        return jnp.concatenate([obs, prev_action, first[:, None].astype(jnp.float32)], axis=-1)

    def _encode(self, action):
        if self.discrete:
            return jax.nn.one_hot(action, self.action_dim, dtype=jnp.float32)
        return action.reshape(self.num_envs, -1).astype(jnp.float32)

    def _auto_reset(self, key, done, obs, env_state):
        """Replace the finished envs' (obs, state) with fresh, independent resets."""
        N, k = self.num_envs, self.num_resets
        select = lambda fresh, old: jax.tree.map(
            lambda f, o: jnp.where(done.reshape(-1, *[1] * (o.ndim - 1)), f, o), fresh, old
        )

        def nothing(key):
            return obs, env_state

        def few(key):
            fresh = self._reset_envs(key, k)
            rank = jnp.clip(jnp.cumsum(done) - 1, 0, k - 1)  # the i-th finished env takes reset i
            return select(jax.tree.map(lambda a: a[rank], fresh), (obs, env_state))

        def everyone(key):
            return select(self._reset_envs(key, N), (obs, env_state))

        n_done = done.sum()
        branch = jnp.where(n_done == 0, 0, jnp.where(n_done <= k, 1, 2))
        if k == N:
            branch = jnp.minimum(branch, 1)
        return jax.lax.switch(branch, (nothing, few, everyone), key)

    # -- API ---------------------------------------------------------------------------------
    def reset(self, key):
        obs, env_state = self._reset_envs(key, self.num_envs)
        zeros = jnp.zeros(self.num_envs, jnp.float32)
        state = VecEnvState(
            env_state=env_state,
            prev_action=jnp.zeros((self.num_envs, self.action_dim), jnp.float32),
            first=jnp.ones(self.num_envs, bool),
            episode_returns=zeros,
            episode_lengths=jnp.zeros(self.num_envs, jnp.int32),
            returned_episode_returns=zeros,
            returned_episode_lengths=jnp.zeros(self.num_envs, jnp.int32),
            returned_metrics={m: zeros for m in self.metrics},
        )
        return self._observe(obs, state.prev_action, state.first), state

    def step(self, key, state: VecEnvState, action):
        key_step, key_reset = jax.random.split(key)
        keys = jax.random.split(key_step, self.num_envs)
        obs, env_state, reward, terminated, info = jax.vmap(
            self.env.step_env, in_axes=(0, 0, 0, None)
        )(keys, state.env_state, action, self.params)
        truncated = jax.vmap(self.env.is_truncated, in_axes=(0, None))(env_state, self.params)
        terminated = jnp.asarray(terminated, bool)
        done = terminated | truncated
        reward = jnp.asarray(reward, jnp.float32).reshape(self.num_envs)
        obs = obs.reshape(self.num_envs, -1).astype(jnp.float32)
        obs, env_state = self._auto_reset(key_reset, done, obs, env_state)

        ret = state.episode_returns + reward
        length = state.episode_lengths + 1
        keep = lambda new, old: jnp.where(done, new, old)
        metrics = {
            m: keep(jnp.asarray(info[m], jnp.float32), state.returned_metrics[m])
            for m in self.metrics
        }
        prev = jnp.where(done[:, None], 0.0, self._encode(action))
        state = VecEnvState(
            env_state=env_state,
            prev_action=prev,
            first=done,
            episode_returns=jnp.where(done, 0.0, ret),
            episode_lengths=jnp.where(done, 0, length),
            returned_episode_returns=keep(ret, state.returned_episode_returns),
            returned_episode_lengths=keep(length, state.returned_episode_lengths),
            returned_metrics=metrics,
        )
        out_info = {
            "terminated": terminated,
            "truncated": truncated,
            "returned_episode": done,
            "returned_episode_returns": state.returned_episode_returns,
            "returned_episode_lengths": state.returned_episode_lengths,
            **{f"returned_episode_{m}": v for m, v in metrics.items()},
        }
        return self._observe(obs, prev, done), state, reward, done, out_info
