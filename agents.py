"""The networks PPO trains, time-major, both with one interface:
`network.apply(params, carry, obs [T, B, obs_dim], resets [T, B], aux [T, B]) -> (carry,
policy_out, value [T, B])`, where `policy_out` is logits [T, B, A] or (mean [T, B, A], log_std [A]).

- `ActorCritic`, our default agent: embedding -> memory -> separate actor and critic heads, with a
  sinusoidal step-in-episode encoding appended to the input of every memory alike.
- `PaperAgent`, the SHM authors' POPGym agent (`shared/spec/paper_popgym.md`), with the knobs of
  its ablation (docs/findings/).

`make_network(cfg, ...)` builds either one, and its memory, from a `config.Config`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import shm_jax


def _orth(scale: float) -> Callable:
    return nn.initializers.orthogonal(scale)


def episode_step(t_last: jax.Array, resets: jax.Array) -> jax.Array:
    """The step index inside the episode, t [T, B] int32 (0 at an episode's first step).

    t_last [B]: the index of the step before this sequence (carried between rollouts);
    resets [T, B] bool: the step starts an episode."""
    idx = jnp.arange(resets.shape[0], dtype=jnp.int32)[:, None]
    last_reset = jax.lax.cummax(jnp.where(resets, idx, -1), axis=0)
    return jnp.where(last_reset >= 0, idx - last_reset, t_last + 1 + idx)


def sinusoidal_table(max_len: int, width: int) -> np.ndarray:
    """[max_len, width] float32: row t holds sin(t w_i) at 2i and cos(t w_i) at 2i + 1, with
    w_i = exp(-2i ln(max_len) / width) (the authors' PositionalEncoding with ln(max_len) in place
    of the usual ln(10000); spec/paper_popgym.md)."""
    t = np.arange(max_len, dtype=np.float64)[:, None]
    w = np.exp(-np.arange(0, width, 2, dtype=np.float64) * math.log(max_len) / width)
    table = np.zeros((max_len, width), np.float64)
    table[:, 0::2] = np.sin(t * w)
    table[:, 1::2] = np.cos(t * w)[:, : width // 2]
    return table.astype(np.float32)


MAX_EPISODE_INDEX = 1024  # rows of the time-embedding tables; later steps reuse the last row


def time_encoding(t: jax.Array, width: int) -> jax.Array:
    """Sinusoidal encoding [..., width] of step indices t [...] (clamped to the table)."""
    table = jnp.asarray(sinusoidal_table(MAX_EPISODE_INDEX, width))
    return table[jnp.minimum(t, MAX_EPISODE_INDEX - 1)]


def agent_inputs(carry, obs, resets, pixel_dims: int):
    """What both agents start from: (memory carry, step index t [T, B], float observations
    [T, B, obs_dim] with the leading `pixel_dims` components scaled from 0..255 to [0, 1])."""
    mem_carry, t_last = carry
    x = obs.astype(jnp.float32)
    if pixel_dims:
        x = x.at[..., :pixel_dims].multiply(1.0 / 255.0)
    return mem_carry, episode_step(t_last, resets), x


class AgentBase(nn.Module):
    """What the two agents share: the carry is (memory carry, step index t of the last step)."""

    memory: nn.Module

    def initialize_carry(self, batch_shape: tuple[int, ...]):
        """(memory carry [*batch, ...], t_last int32 [*batch])."""
        return (self.memory.initialize_carry(batch_shape), jnp.zeros(batch_shape, jnp.int32))


class ActorCritic(AgentBase):
    """Embedding -> memory -> actor and critic heads, time-major.

    `__call__(carry, obs [T, B, obs_dim], resets [T, B] bool, aux [T, B])` returns
    `(carry, policy_out, value [T, B])` where `policy_out` is the logits `[T, B, A]` (categorical)
    or `(mean [T, B, A], log_std [A])` (diagonal Gaussian). With `time_embedding > 0` a
    sinusoidal encoding of the step index inside the episode is appended to the observation, the
    same for every memory.
    """

    action_dim: int = 1
    continuous: bool = False
    hidden: int = 128
    pixel_dims: int = 0  # leading obs components that are 0..255 pixels (VecEnv.pixel_dims)
    time_embedding: int = 0
    log_std_init: float = 0.0

    @nn.compact
    def __call__(self, carry, obs, resets, aux):
        mem_carry, t, x = agent_inputs(carry, obs, resets, self.pixel_dims)
        if self.time_embedding:
            x = jnp.concatenate([x, time_encoding(t, self.time_embedding)], axis=-1)
        x = nn.relu(nn.Dense(self.hidden, kernel_init=_orth(math.sqrt(2)), name="embed")(x))
        mem_carry, y = self.memory(mem_carry, x, resets, aux)  # y: [T, B, features]
        a, value = default_heads(y, self.action_dim, self.hidden)
        if self.continuous:
            init = nn.initializers.constant(self.log_std_init)
            log_std = self.param("log_std", init, (self.action_dim,))
            policy_out = (a, log_std)
        else:
            policy_out = a
        return (mem_carry, t[-1]), policy_out, value


def default_heads(y, action_dim: int, hidden: int):
    """The default agent's actor and critic, separate from the memory's output y on: (logits or
    mean [..., A], value [...]), each one ReLU layer of `hidden` units (orthogonal, gain √2),
    then orthogonal gain 0.01 (actor) or 1 (critic). Call it inside a compact module."""
    a = nn.relu(nn.Dense(hidden, kernel_init=_orth(math.sqrt(2)))(y))
    a = nn.Dense(action_dim, kernel_init=_orth(0.01))(a)
    v = nn.relu(nn.Dense(hidden, kernel_init=_orth(math.sqrt(2)))(y))
    return a, nn.Dense(1, kernel_init=_orth(1.0))(v)[..., 0]


class TorchDense(nn.Module):
    """nn.Dense with torch.nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    and orthogonal (gain 1) weights unless told otherwise: the authors' agent's layers.
    `torch_bias=False` starts the bias at 0 instead (an ablation)."""

    features: int
    kernel_init: Callable = nn.initializers.orthogonal(1.0)
    torch_bias: bool = True

    @nn.compact
    def __call__(self, x):
        bound = 1.0 / math.sqrt(x.shape[-1])
        bias_init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, -bound, bound
        )
        if not self.torch_bias:
            bias_init = nn.initializers.zeros
        return nn.Dense(self.features, kernel_init=self.kernel_init, bias_init=bias_init)(x)


class PaperAgent(AgentBase):
    """The SHM authors' POPGym agent (spec/paper_popgym.md), time-major, same interface as
    `ActorCritic`: feature map Linear(obs -> 128) + LayerNorm (no scale/shift); for SHM the time
    embedding x <- (1 - s) x + s pe[t] with a learned strength s (clamped to [0, 1] after every
    update by `project_params`); Linear(128 -> 64) + ReLU; the memory (SHM's read-out widened to
    1024 by the layer's output projection); Linear(-> 64) + ReLU; actor Linear(64 -> 64) then
    Linear(64 -> A), critic Linear(64 -> 64) then Linear(64 -> 1), both last layers N(0, 0.01²).
    """

    action_dim: int = 1
    continuous: bool = False
    pixel_dims: int = 0
    time_embedding: str = "blend"  # "blend" (the authors'), "append" (16 wide) or "off"
    time_strength: float = 0.5  # the blend's learned s starts here (the authors' 0.5)
    append_width: int = 16  # the appended encoding's width (ablation knob)
    append_scale: float = 1.0  # a fixed factor on the appended encoding (ablation knob)
    append_pad: int = 0  # zeros after the appended encoding: only the fan-in grows (ablation knob)
    input_norm: bool = True  # the LayerNorm after the feature map (ablation knob)
    memory_input: int = 64  # width of the ReLU preprocessor, the memory's input (ablation knob)
    heads: str = "paper"  # "paper" or "default": `default_heads` on the memory's output (ablation)
    hidden: int = 128  # the default heads' width
    feature_map: bool = True  # the 128-wide linear feature map before the preprocessor (ablation)
    torch_bias: bool = True  # biases start at torch's U(±1/√fan_in), else 0 (ablation)

    @nn.compact
    def __call__(self, carry, obs, resets, aux):
        mem_carry, t, x = agent_inputs(carry, obs, resets, self.pixel_dims)
        Dense = functools.partial(TorchDense, torch_bias=self.torch_bias)
        if self.feature_map:
            x = Dense(128, name="feature_map")(x)
        if self.input_norm:
            x = nn.LayerNorm(use_scale=False, use_bias=False)(x)
        if self.time_embedding == "blend":
            s = self.param("time_strength", nn.initializers.constant(self.time_strength), ())
            x = (1.0 - s) * x + s * time_encoding(t, 128)
        elif self.time_embedding == "append":
            pe = self.append_scale * time_encoding(t, self.append_width)
            pad = jnp.zeros((*pe.shape[:-1], self.append_pad), pe.dtype)
            x = jnp.concatenate([x, pe, pad], axis=-1)
        x = nn.relu(Dense(self.memory_input, name="preprocessor")(x))
        mem_carry, y = self.memory(mem_carry, x, resets, aux)
        if self.heads == "default":
            a, value = default_heads(y, self.action_dim, self.hidden)
        else:
            y = nn.relu(Dense(64, name="postprocessor")(y))
            small = nn.initializers.normal(0.01)
            a = Dense(64, name="actor_hidden")(y)
            a = Dense(self.action_dim, kernel_init=small, name="actor_out")(a)
            v = Dense(64, name="critic_hidden")(y)
            value = Dense(1, kernel_init=small, name="critic_out")(v)[..., 0]
        policy_out = a
        if self.continuous:
            log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
            policy_out = (a, log_std)
        return (mem_carry, t[-1]), policy_out, value


def project_params(params):
    """Keep constrained parameters in range after an optimiser step: the paper agent's time
    embedding strength is clamped to [0, 1] (as the authors' training callback does)."""

    def clamp(path, x):
        name = getattr(path[-1], "key", None)
        return jnp.clip(x, 0.0, 1.0) if name == "time_strength" else x

    return jax.tree_util.tree_map_with_path(clamp, params)


def check_paper_knobs(cfg) -> None:
    """The paper agent's ablation knobs (`Config.paper_*`): each must be in range and may only
    be moved from its default where it acts. ValueError naming the bad flag and the fix."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    if not 0.0 <= cfg.paper_time_strength <= 1.0:
        raise ValueError(
            f"--paper-time-strength must be in [0, 1] (the blend's s is clamped there), "
            f"got {cfg.paper_time_strength}"
        )

    if cfg.paper_time_strength != defaults["paper_time_strength"] and (
        cfg.paper_time_embedding != "blend"
    ):
        raise ValueError(
            "--paper-time-strength sets where the blended time embedding's s starts: drop it, "
            "or use --paper-time-embedding blend"
        )
    if cfg.paper_append_width < 2 or cfg.paper_append_width % 2:
        raise ValueError(
            f"--paper-append-width must be an even width >= 2, got {cfg.paper_append_width}"
        )
    if not cfg.paper_append_scale > 0:
        raise ValueError(f"--paper-append-scale must be > 0, got {cfg.paper_append_scale}")
    if cfg.paper_append_pad < 0:
        raise ValueError(f"--paper-append-pad must be >= 0, got {cfg.paper_append_pad}")
    for name in ("width", "scale", "pad"):
        field = f"paper_append_{name}"
        if getattr(cfg, field) != defaults[field] and cfg.paper_time_embedding != "append":
            raise ValueError(
                f"--paper-append-{name} applies to the appended step encoding: add "
                "--paper-time-embedding append"
            )
    if cfg.paper_memory_input < 1:
        raise ValueError(f"--paper-memory-input must be >= 1, got {cfg.paper_memory_input}")
    if not cfg.paper_feature_map and (
        cfg.paper_input_norm
        or (cfg.memory.startswith("shm") and cfg.paper_time_embedding == "blend")
    ):
        raise ValueError(
            "--no-paper-feature-map removes the 128-wide features that the LayerNorm and the "
            "blended time embedding act on: add --no-paper-input-norm and "
            "--paper-time-embedding append (or off)"
        )


def make_network(cfg, action_dim: int, continuous: bool, pixel_dims: int):
    """(network, memory) for `cfg` (a `config.Config`): the memory from `shm_jax.make_memory`,
    inside `ActorCritic` or `PaperAgent` per `cfg.agent` (`config.validate` checks cfg first)."""
    is_shm = cfg.memory.startswith("shm")
    extra = {"method": cfg.memory_method, "theta_init": cfg.theta_init} if is_shm else {}
    if cfg.memory in ("shm", "shm_single"):  # the memories with W_c
        extra["calib_init"] = cfg.calib_init
    if cfg.memory == "gru":
        extra["unroll"] = cfg.memory_unroll or None
    if cfg.agent == "paper":
        # The authors widen SHM's read-out to 1024; their other memories output their own width.
        readout = (cfg.paper_readout or None) if is_shm else None
        memory = shm_jax.make_memory(cfg.memory, size=cfg.mem_size, features=readout, **extra)
        network = PaperAgent(
            memory,
            action_dim,
            continuous,
            pixel_dims,
            time_embedding=cfg.paper_time_embedding if is_shm else "off",  # SHM's alone
            time_strength=cfg.paper_time_strength,
            append_width=cfg.paper_append_width,
            append_scale=cfg.paper_append_scale,
            append_pad=cfg.paper_append_pad,
            input_norm=cfg.paper_input_norm,
            memory_input=cfg.paper_memory_input,
            heads=cfg.paper_heads,
            hidden=cfg.hidden,
            feature_map=cfg.paper_feature_map,
            torch_bias=cfg.paper_bias_init == "torch",
        )
    else:
        memory = shm_jax.make_memory(
            cfg.memory, size=cfg.mem_size, features=cfg.memory_features or None, **extra
        )
        network = ActorCritic(
            memory,
            action_dim,
            continuous,
            cfg.hidden,
            pixel_dims,
            cfg.time_embedding,
            cfg.log_std_init,
        )
    return network, memory
