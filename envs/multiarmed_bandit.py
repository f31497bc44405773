"""MultiarmedBandit (POPGym): find and exploit the best arm within one episode, in JAX.

A rule-for-rule port of `popgym.envs.multiarmed_bandit` (popgym 1.0.7):

- At reset each of the K arms (10 / 20 / 30) draws its payout probability ~ U[0, 1) (float32).
- Action: the arm. The arm pays out with its probability; observation one-hot(payout) (2
  entries), the first observation is 0.
- Reward: +1/L on a payout, -1/L otherwise, L = 200 / 400 / 600.
- Never terminated; truncated at step L.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces


@struct.dataclass
class EnvState(environment.EnvState):
    odds: jax.Array  # float32 [K]: payout probability of each arm (popgym's `bandits`)


@struct.dataclass
class EnvParams(environment.EnvParams):
    max_steps_in_episode: int = 200


class MultiarmedBandit(environment.Environment[EnvState, EnvParams]):
    """popgym's MultiarmedBandit with `num_bandits` arms and `episode_length` steps."""

    # popgym: the optimal policy needs the previous action in the observation (see the
    # previous-action wrapper; off by default, as in the SHM paper's runs).
    obs_requires_prev_action = True

    def __init__(self, num_bandits: int = 10, episode_length: int = 200):
        super().__init__()
        for name, value in (("num_bandits", num_bandits), ("episode_length", episode_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_bandits = num_bandits
        self.episode_length = episode_length
        self.reward_scale = 1.0 / episode_length

    @property
    def default_params(self) -> EnvParams:
        return EnvParams(max_steps_in_episode=self.episode_length)

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """Draw the arms' odds ~ U[0, 1); obs [2] is one-hot(0)."""
        return self.reset_from_odds(jax.random.uniform(key, (self.num_bandits,)))

    def reset_from_odds(self, odds: jax.Array) -> tuple[jax.Array, EnvState]:
        """Start an episode with payout probabilities `odds` (float [K])."""
        state = EnvState(time=jnp.int32(0), odds=jnp.asarray(odds, jnp.float32))
        return jax.nn.one_hot(0, 2, dtype=jnp.float32), state

    def step_env(
        self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict]:
        """Pull arm `action`; pays +1/L with the arm's probability, else -1/L."""
        payout = jax.random.uniform(key) < state.odds[jnp.asarray(action, jnp.int32)]
        reward = jnp.where(payout, self.reward_scale, -self.reward_scale).astype(jnp.float32)
        obs = jax.nn.one_hot(payout.astype(jnp.int32), 2, dtype=jnp.float32)
        return obs, state.replace(time=state.time + 1), reward, jnp.bool_(False), {}

    @property
    def name(self) -> str:
        return f"MultiarmedBandit-{self.num_bandits}x{self.episode_length}"

    @property
    def num_actions(self) -> int:
        return self.num_bandits

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        """One action per arm: Discrete(K)."""
        return spaces.Discrete(self.num_bandits)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        """one-hot(payout): Box [2]."""
        return spaces.Box(0.0, 1.0, (2,), jnp.float32)


REGISTRY = {
    "MultiarmedBanditEasy": functools.partial(MultiarmedBandit, num_bandits=10, episode_length=200),
    "MultiarmedBanditMedium": functools.partial(
        MultiarmedBandit, num_bandits=20, episode_length=400
    ),
    "MultiarmedBanditHard": functools.partial(MultiarmedBandit, num_bandits=30, episode_length=600),
}
