"""POPGym's partially observable CartPoles in JAX (popgym 1.0.7 on gymnasium's CartPole-v1).

A rule-for-rule port of `popgym.envs.position_only_cartpole`,
`popgym.envs.noisy_position_only_cartpole` and `popgym.envs.velocity_only_cartpole`:

- Dynamics: gymnasium's CartPole-v1 (Euler integration, tau 0.02 s, force +-10 N, pole half
  length 0.5 m, masses 1.0 / 0.1 kg, gravity 9.8). Action 0 pushes left, 1 pushes right.
- Start state: (x, x_dot, theta, theta_dot) ~ U(-0.05, 0.05)^4.
- Terminated when |x| > 2.4 or |theta| > 12 degrees after the move; truncated at step L
  (both can hold on the same step).
- Reward: 1/L on every step, the terminating one included (popgym maps gymnasium's +1 to 1/L;
  its -1 only appears when stepping an already-terminated episode, which auto-reset prevents).
- Observation (float32 [2]):
    PositionOnly: [x, theta].
    NoisyPositionOnly: [x, theta] + N(0, sigma^2) per entry, clipped to +-[4.8, 0.4189] (the
      observation box); popgym keeps L = 200 at every noise level.
    VelocityOnly: [x_dot, theta_dot] after every step, but popgym's reset returns [x, theta]
      (a popgym 1.0.7 quirk, kept for faithfulness; all four start values are U(-0.05, 0.05)).

The state is float32 where gymnasium keeps float64, so long free-running trajectories of this
unstable system drift apart after some tens of steps; each single transition agrees to ~1e-6.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

# gymnasium CartPole-v1 constants.
GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
TOTAL_MASS = MASS_CART + MASS_POLE
HALF_LENGTH = 0.5
POLEMASS_LENGTH = MASS_POLE * HALF_LENGTH
FORCE_MAG = 10.0
TAU = 0.02
THETA_THRESHOLD = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4
# popgym's position observation box (float32), the clip range of the noisy variant.
OBS_HIGH = (X_THRESHOLD * 2, THETA_THRESHOLD * 2)

OBSERVE = ("position", "velocity")


@struct.dataclass
class EnvState(environment.EnvState):
    x: jax.Array  # float32 []: cart position
    x_dot: jax.Array  # float32 []: cart velocity
    theta: jax.Array  # float32 []: pole angle (rad)
    theta_dot: jax.Array  # float32 []: pole angular velocity


@struct.dataclass
class EnvParams(environment.EnvParams):
    max_steps_in_episode: int = 200


def cartpole_dynamics(state: EnvState, action: jax.Array) -> EnvState:
    """One Euler step of gymnasium's CartPole-v1 (action 1 pushes right, 0 left)."""
    force = jnp.where(action == 1, FORCE_MAG, -FORCE_MAG)
    cos, sin = jnp.cos(state.theta), jnp.sin(state.theta)
    temp = (force + POLEMASS_LENGTH * state.theta_dot**2 * sin) / TOTAL_MASS
    theta_acc = (GRAVITY * sin - cos * temp) / (
        HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos**2 / TOTAL_MASS)
    )
    x_acc = temp - POLEMASS_LENGTH * theta_acc * cos / TOTAL_MASS
    return state.replace(
        x=state.x + TAU * state.x_dot,
        x_dot=state.x_dot + TAU * x_acc,
        theta=state.theta + TAU * state.theta_dot,
        theta_dot=state.theta_dot + TAU * theta_acc,
        time=state.time + 1,
    )


class CartPole(environment.Environment[EnvState, EnvParams]):
    """popgym's PositionOnly / NoisyPositionOnly / VelocityOnly CartPole.

    Args:
        observe: "position" ([x, theta]) or "velocity" ([x_dot, theta_dot]).
        noise_sigma: std of the Gaussian noise added to position observations (0 = none).
        episode_length: L, the truncation step; the reward is 1/L per step.
    """

    def __init__(
        self, observe: str = "position", noise_sigma: float = 0.0, episode_length: int = 200
    ):
        super().__init__()
        if observe not in OBSERVE:
            raise ValueError(f"observe must be one of {OBSERVE}, got {observe!r}")
        if not isinstance(episode_length, int) or episode_length < 1:
            raise ValueError(f"episode_length must be a positive int, got {episode_length!r}")
        if not noise_sigma >= 0:
            raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma!r}")
        if noise_sigma > 0 and observe != "position":
            raise ValueError(
                "noise_sigma > 0 needs observe='position' (popgym has no noisy velocity)"
            )
        self.observe = observe
        self.noise_sigma = float(noise_sigma)
        self.episode_length = episode_length

    @property
    def default_params(self) -> EnvParams:
        return EnvParams(max_steps_in_episode=self.episode_length)

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        """Start state ~ U(-0.05, 0.05)^4; obs [2] is [x, theta] (+ noise) for every variant."""
        key_state, key_noise = jax.random.split(key)
        x, x_dot, theta, theta_dot = jax.random.uniform(key_state, (4,), minval=-0.05, maxval=0.05)
        state = EnvState(time=jnp.int32(0), x=x, x_dot=x_dot, theta=theta, theta_dot=theta_dot)
        # popgym's reset shows [x, theta] even for VelocityOnlyCartPole.
        return self._noisy(key_noise, jnp.stack([x, theta])), state

    def step_env(
        self, key: jax.Array, state: EnvState, action: jax.Array, params: EnvParams
    ) -> tuple[jax.Array, EnvState, jax.Array, jax.Array, dict]:
        """Push the cart; reward 1/L; terminated when the cart or pole leaves its bounds."""
        state = cartpole_dynamics(state, jnp.asarray(action, jnp.int32))
        terminated = (
            (state.x < -X_THRESHOLD)
            | (state.x > X_THRESHOLD)
            | (state.theta < -THETA_THRESHOLD)
            | (state.theta > THETA_THRESHOLD)
        )
        reward = jnp.float32(1.0 / self.episode_length)
        return self.get_obs(state, key), state, reward, terminated, {}

    def get_obs(self, state: EnvState, key: jax.Array) -> jax.Array:
        """The observation [2] after a step (`key` draws the noise of the noisy variant)."""
        if self.observe == "velocity":
            return jnp.stack([state.x_dot, state.theta_dot])
        return self._noisy(key, jnp.stack([state.x, state.theta]))

    def _noisy(self, key: jax.Array, obs: jax.Array) -> jax.Array:
        if self.noise_sigma == 0.0:
            return obs
        high = jnp.asarray(OBS_HIGH, jnp.float32)
        noise = self.noise_sigma * jax.random.normal(key, obs.shape, jnp.float32)
        return jnp.clip(obs + noise, -high, high)

    @property
    def name(self) -> str:
        noisy = f"Noisy(sigma={self.noise_sigma})" if self.noise_sigma else ""
        return f"{noisy}{self.observe.capitalize()}OnlyCartPole-{self.episode_length}"

    @property
    def num_actions(self) -> int:
        return 2

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete:
        """Discrete(2): 0 pushes left, 1 pushes right."""
        return spaces.Discrete(2)

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        """Box [2]: +-[4.8, 0.4189] for positions, unbounded for velocities (as popgym)."""
        if self.observe == "velocity":
            return spaces.Box(-jnp.inf, jnp.inf, (2,), jnp.float32)
        high = jnp.asarray(OBS_HIGH, jnp.float32)
        return spaces.Box(-high, high, (2,), jnp.float32)


def _levels(prefix: str, **variants) -> dict:
    return {
        f"{prefix}{level}": functools.partial(CartPole, **kwargs)
        for level, kwargs in variants.items()
    }


_POSITION = _levels(
    "PositionOnlyCartPole",
    Easy=dict(episode_length=200),
    Medium=dict(episode_length=400),
    Hard=dict(episode_length=600),
)
_NOISY = _levels(
    "NoisyPositionOnlyCartPole",
    Easy=dict(noise_sigma=0.1),
    Medium=dict(noise_sigma=0.2),
    Hard=dict(noise_sigma=0.3),
)
_VELOCITY = _levels(
    "VelocityOnlyCartPole",
    Easy=dict(observe="velocity", episode_length=200),
    Medium=dict(observe="velocity", episode_length=400),
    Hard=dict(observe="velocity", episode_length=600),
)

REGISTRY = {
    **_POSITION,
    **_NOISY,
    **_VELOCITY,
    # The spec's and popjaxrl's names for the position-only variants.
    **{k.replace("PositionOnly", "Stateless"): v for k, v in {**_POSITION, **_NOISY}.items()},
}
