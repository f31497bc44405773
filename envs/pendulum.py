"""POPGym's partially observable Pendulums in JAX (popgym 1.0.7 on gymnasium's Pendulum-v1).

A rule-for-rule port of `popgym.envs.position_only_pendulum` and
`popgym.envs.noisy_position_only_pendulum`:

- Dynamics: gymnasium's Pendulum (g 10, m 1, l 1, dt 0.05): the torque u = clip(a, -2, 2),
  theta_dot' = clip(theta_dot + (3g/(2l) sin(theta) + 3/(m l^2) u) dt, -8, 8),
  theta' = theta + theta_dot' dt.
- Start state: theta ~ U(-pi, pi), theta_dot ~ U(-1, 1).
- Reward: gymnasium's r = -(norm(theta)^2 + 0.1 theta_dot^2 + 0.001 u^2) on the state before the
  move, rescaled by popgym to (r + 8.1368022) / 8.1368022 / L, so each step pays in [-1/L, 1/L].
- Never terminated; truncated at step L = 200 / 150 / 100 (PositionOnly Easy / Medium / Hard);
  the noisy levels all keep L = 200.
- Observation (float32 [2]): [cos(theta), sin(theta)]; the noisy variant adds N(0, sigma^2) per
  entry and clips to [-1, 1].
- Action: Box(-2, 2, (1,)) torque.

theta is stored wrapped to [-pi, pi) (gymnasium lets it grow): the same dynamics, observations
and rewards, with float32 precision that does not decay as the pendulum spins.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

# gymnasium Pendulum-v1 constants.
MAX_SPEED = 8.0
MAX_TORQUE = 2.0
DT = 0.05
G = 10.0
M = 1.0
LENGTH = 1.0
# popgym's reward rescaling: gymnasium's reward lies in [-16.2736044, 0].
REWARD_HALF_RANGE = 16.2736044 / 2


@struct.dataclass
class EnvState(environment.EnvState):
    theta: jax.Array  # float32 []: angle (rad), 0 = upright
    theta_dot: jax.Array  # float32 []: angular velocity


@struct.dataclass
class EnvParams(environment.EnvParams):
    max_steps_in_episode: int = 200


def angle_normalize(x: jax.Array) -> jax.Array:
    """Wrap an angle to [-pi, pi)."""
    return (x + jnp.pi) % (2 * jnp.pi) - jnp.pi


class Pendulum(environment.Environment[EnvState, EnvParams]):
    """popgym's PositionOnly / NoisyPositionOnly Pendulum.

    Args:
        noise_sigma: std of the Gaussian noise added to the observation (0 = none).
        episode_length: L, the truncation step; rewards are scaled by 1/L.
    """

    def __init__(self, noise_sigma: float = 0.0, episode_length: int = 200):
        super().__init__()
        if not isinstance(episode_length, int) or episode_length < 1:
            raise ValueError(f"episode_length must be a positive int, got {episode_length!r}")
        if not noise_sigma >= 0:
            raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma!r}")
        self.noise_sigma = float(noise_sigma)
        self.episode_length = episode_length

    @property
    def default_params(self) -> EnvParams:
        return EnvParams(max_steps_in_episode=self.episode_length)

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """theta ~ U(-pi, pi), theta_dot ~ U(-1, 1); obs [2] = [cos, sin] (+ noise)."""
        key_state, key_noise = jax.random.split(key)
        high = jnp.array([math.pi, 1.0], jnp.float32)
        theta, theta_dot = jax.random.uniform(key_state, (2,), minval=-high, maxval=high)
        state = EnvState(time=jnp.int32(0), theta=theta, theta_dot=theta_dot)
        return self.get_obs(state, key_noise), state

    def step_env(
        self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict]:
        """Apply torque `action` (float [1]); reward rescaled to [-1/L, 1/L]; never terminated."""
        u = jnp.clip(jnp.reshape(action, (-1,))[0], -MAX_TORQUE, MAX_TORQUE)
        th, thdot = state.theta, state.theta_dot
        cost = angle_normalize(th) ** 2 + 0.1 * thdot**2 + 0.001 * u**2
        new_thdot = thdot + (3 * G / (2 * LENGTH) * jnp.sin(th) + 3.0 / (M * LENGTH**2) * u) * DT
        new_thdot = jnp.clip(new_thdot, -MAX_SPEED, MAX_SPEED)
        new_th = angle_normalize(th + new_thdot * DT)
        reward = (REWARD_HALF_RANGE - cost) / REWARD_HALF_RANGE / self.episode_length
        state = EnvState(time=state.time + 1, theta=new_th, theta_dot=new_thdot)
        return self.get_obs(state, key), state, reward.astype(jnp.float32), jnp.bool_(False), {}

    def get_obs(self, state: EnvState, key: jax.Array) -> jax.Array:
        """[cos(theta), sin(theta)] (float32 [2]), plus clipped noise in the noisy variant."""
        obs = jnp.stack([jnp.cos(state.theta), jnp.sin(state.theta)])
        if self.noise_sigma == 0.0:
            return obs
        noise = self.noise_sigma * jax.random.normal(key, obs.shape, jnp.float32)
        return jnp.clip(obs + noise, -1.0, 1.0)

    @property
    def name(self) -> str:
        noisy = f"Noisy(sigma={self.noise_sigma})" if self.noise_sigma else ""
        return f"{noisy}PositionOnlyPendulum-{self.episode_length}"

    @property
    def num_actions(self) -> int:
        return 1

    def action_space(self, params: EnvParams | None = None) -> spaces.Box:
        """Box(-2, 2, (1,)): the torque."""
        return spaces.Box(-MAX_TORQUE, MAX_TORQUE, (1,), jnp.float32)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        """Box(-1, 1, (2,)): [cos(theta), sin(theta)]."""
        return spaces.Box(-1.0, 1.0, (2,), jnp.float32)


_POSITION = {
    "PositionOnlyPendulumEasy": functools.partial(Pendulum, episode_length=200),
    "PositionOnlyPendulumMedium": functools.partial(Pendulum, episode_length=150),
    "PositionOnlyPendulumHard": functools.partial(Pendulum, episode_length=100),
}
_NOISY = {
    "NoisyPositionOnlyPendulumEasy": functools.partial(Pendulum, noise_sigma=0.1),
    "NoisyPositionOnlyPendulumMedium": functools.partial(Pendulum, noise_sigma=0.2),
    "NoisyPositionOnlyPendulumHard": functools.partial(Pendulum, noise_sigma=0.3),
}

REGISTRY = {
    **_POSITION,
    **_NOISY,
    # The spec's and popjaxrl's names.
    **{k.replace("PositionOnly", "Stateless"): v for k, v in {**_POSITION, **_NOISY}.items()},
}
