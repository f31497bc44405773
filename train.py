"""Recurrent PPO for memory agents (SHM, GRU, ...) whose whole training run compiles into one XLA
program, in the style of PureJaxRL's `ppo_rnn.py`.

    python train.py --env RepeatFirstEasy --memory shm --num-seeds 2 --out runs/rf-easy
    python train.py --resume runs/rf-easy        # continue it after Ctrl-C
    python train.py --eval runs/rf-easy          # reload its params and report returns
    python train.py --preset paper-popgym --env RepeatPreviousHard --memory shm

Reading order: `Config` (every knob, typed) -> networks (`ActorCritic`: embedding -> memory ->
actor / critic heads; `PaperAgent`, the SHM authors' POPGym agent) -> PPO pieces (KL penalty,
value loss, `gae`) -> evaluation and inspection (`make_evaluate`; `replay_episode` and
`memory_trace` for notebooks) -> `make_train(cfg)`, which returns a pure `train(keys)` that
`jax.jit` compiles whole (one `lax.scan` over updates; in each update a rollout scan, GAE, and a
scan over epochs x minibatches; seeds under `lax.map` or `jax.vmap`). The run's lifecycle
(segments, checkpoints, resume, Ctrl-C, logs, outputs, evaluation, the CLI) is run.py.

The memory's per-step randomness (SHM's random θ row indices, `aux`) is drawn while acting, stored
in the rollout and replayed in the update, which re-runs the memory from the rollout's initial
carry: the update scores exactly the policy that acted (on the first minibatch of each update the
probability ratio is 1 and the KL 0, logged as `ratio_dev_first` / `kl_first`). The authors'
RLlib update re-draws θ instead (spec/shm.md, "disagree" item 3).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

if __name__ == "__main__":  # first: gymnax's import below starts jax's backend (launch.py)
    import launch

    launch.start_from_command_line()

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from gymnax.environments import spaces

import envs
import shm_jax

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Recurrent PPO with a memory module (SHM, GRU, ...) on a jitted environment.

    Also: `python train.py --resume DIR` continues a run, `--eval DIR` evaluates one, `--list`
    prints every env id and memory name (run.py).
    """

    env: str = "RepeatFirstEasy"
    """Environment id: any of `envs.registered` (e.g. RepeatPreviousEasy) or a gymnax id
    (`python train.py --list` prints them)."""
    memory: str = "shm"
    """Memory module, any name in `shm_jax.memory_names`."""
    memory_size: int = 32
    """Memory size: H for SHM (the memory is H x H), the hidden size for GRU and the others."""
    memory_features: int = 0
    """Default agent: the memory's output width (SHM's output projection W_o; 0 = the memory
    size, as the layer defaults to)."""
    theta_init: Literal["xavier", "xavier_abs"] = "xavier"
    """SHM (either agent): initialisation of the calibration bank Θ (`shm_jax.SHM.theta_init`):
    xavier (the paper's Xavier-uniform) or xavier_abs (|Xavier-uniform|: every row starts with
    the same signs, so whether C_t forgets is set by the learned c_t, not by which random row was
    drawn). xavier_abs learns short POPGym tasks ~3x faster (RepeatPreviousEasy), but where c_t
    stays positive every C_t entry of a column exceeds 1, and on episodes of 100+ steps (Wind,
    Visual Match) the memory overflows float32 in the first update (README, "Why SHM learned
    slowly")."""
    calib_init: Literal["lecun", "zeros"] = "lecun"
    """SHM with θ calibration (either agent): initialisation of W_c, c_t = W_c x̂_t
    (`shm_jax.SHM.calib_init`): lecun (flax's default) or zeros (c_t = 0, so C_t = 1 at the
    start; W_c learns from the first update). With --theta-init xavier_abs: shared signs in Θ
    without the first-update overflow on long episodes (README, "A bounded |Xavier| start")."""
    memory_method: Literal["auto", "sequential", "associative", "chunked", "pallas", "native"] = (
        "auto"
    )
    """SHM: how the layer computes the recurrence (`shm_jax.SHM.method`); the numbers are the
    same, only speed and memory differ. auto = the fastest form measured (README "Performance"):
    native on a CPU (sequential if the C++ kernel cannot be built), pallas on a GPU; native = the
    C++ CPU kernel (`shm_jax.native`, built on first use); sequential = `lax.scan` with a
    hand-written backward; pallas = the fused GPU kernel (`shm_jax.kernel.pallas_read`;
    interpreted, very slowly, on a CPU)."""
    memory_unroll: int = 0
    """GRU: time steps per iteration of its compiled scan (speed only). 0 = by backend: 16 on a
    GPU (2.3x faster there), 1 on a CPU (where 16 is 2.4x slower): README "Performance"."""
    memory_size_auto: bool = False
    """Pick --memory-size from the env's level as the authors did (SHM: 128 Easy, 64 Medium,
    32 Hard; other memories 64, their script's GRU default). `--preset paper-popgym` sets it."""
    hidden: int = 128
    """Width of the observation embedding and of the actor / critic hidden layers."""
    agent: Literal["default", "paper"] = "default"
    """Network: default = embedding -> memory -> heads; paper = the SHM authors' POPGym agent
    (spec/paper_popgym.md: 128-wide feature map, LayerNorm, time embedding for SHM only, 64-wide
    pre/post-processors, SHM read-out widened to 1024)."""
    time_embedding: int = 16
    """Default agent: width of a sinusoidal encoding of the step index inside the episode,
    appended to every memory's input alike (0 = off). Without it SHM cannot tell how far back a
    write was (README, "Why SHM learned slowly"). The paper agent uses its own 128-wide one."""
    paper_time_embedding: Literal["blend", "append", "off"] = "blend"
    """Paper agent, SHM: how the step index reaches the memory. blend = the authors'
    x <- (1 - s)·x + s·pe[t] over the 128 features (s learned, from 0.5); append = our default
    agent's way, a 16-wide encoding appended to the features; off = none. An ablation knob
    (README, "The authors' agent under our PPO")."""
    paper_append_width: int = 16
    """Paper agent, --paper-time-embedding append: the appended encoding's width (16, our
    default agent's; 128 = the authors' blend code, appended instead of added). An ablation knob
    (README, "Which part of the authors' agent slows SHM")."""
    paper_append_scale: float = 1.0
    """Paper agent, --paper-time-embedding append: a fixed factor on the appended encoding (1 =
    as our default agent has it). An ablation knob, like --paper-append-width."""
    paper_append_pad: int = 0
    """Paper agent, --paper-time-embedding append: this many zeros appended after the encoding.
    They add nothing to the forward pass and get no gradient; they only widen the
    preprocessor's fan-in, so its torch-style init starts smaller. An ablation knob, like
    --paper-append-width."""
    paper_time_strength: float = 0.5
    """Paper agent, --paper-time-embedding blend: the start of the learned strength s, in
    [0, 1] (the authors' 0.5). An ablation knob (README, "Which part of the authors' agent
    slows SHM")."""
    paper_input_norm: bool = True
    """Paper agent: the LayerNorm (no scale or shift) after the 128-wide feature map, as the
    authors have it. An ablation knob (README, "Which part of the authors' agent slows SHM")."""
    paper_memory_input: int = 64
    """Paper agent: width of the ReLU preprocessor layer whose output is the memory's input (the
    authors' 64). An ablation knob, like --paper-input-norm."""
    paper_readout: int = 1024
    """Paper agent, SHM: width of SHM's output projection, the read-out the 64-wide
    postprocessor takes (the authors' 1024; 0 = the memory size H, as the default agent has it).
    An ablation knob, like --paper-input-norm."""
    paper_heads: Literal["paper", "default"] = "paper"
    """Paper agent: the actor and critic after the memory. paper = the authors' shared 64-wide
    ReLU postprocessor, then a linear 64-wide layer and the output layer per head; default = the
    default agent's heads (a separate ReLU layer of --hidden units per head). An ablation knob,
    like --paper-input-norm."""
    paper_feature_map: bool = True
    """Paper agent: the linear 128-wide feature map (and its LayerNorm) before the preprocessor,
    as the authors have it. Without it the observation (with a 16-wide step encoding appended
    under --paper-time-embedding append) goes straight into the ReLU preprocessor, as in the
    default agent. An ablation knob, like --paper-input-norm."""
    paper_bias_init: Literal["torch", "zeros"] = "torch"
    """Paper agent: the start of every layer's bias. torch = torch.nn.Linear's default
    U(±1/√fan_in), as the authors' layers start; zeros = 0, as the default agent's layers
    start. An ablation knob, like --paper-input-norm."""
    head: Literal["auto", "categorical", "gaussian"] = "auto"
    """Action head; auto = categorical for Discrete, diagonal Gaussian for Box action spaces."""
    log_std_init: float = 0.0
    """Diagonal Gaussian head: initial log standard deviation of every action component (a
    learned, state-independent parameter)."""
    prev_action: bool = True
    """Append the previous action (one-hot; raw for Box actions) and a first-step flag to the
    observation. popgym's baselines do; the SHM authors' POPGym runs did not, so `--preset popgym`
    turns it off. On by default because it makes the short default run solve RepeatFirstEasy
    (return 1.0 at 500k steps, against -0.48 without it)."""
    total_timesteps: int = 500_000
    """Env steps per seed (rounded down to whole updates of num_envs x num_steps)."""
    num_envs: int = 32
    """Parallel environments per seed."""
    num_steps: int = 128
    """Rollout length per env per update (the sequence length the memory is trained on)."""
    num_epochs: int = 4
    """PPO epochs over each rollout."""
    num_minibatches: int = 4
    """Minibatches per epoch, split along envs so each keeps whole sequences."""
    lr: float = 1e-3
    """Adam learning rate."""
    anneal_lr: bool = False
    """Anneal the learning rate linearly to 0 over the run."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """PPO ratio clip (also clips the value update)."""
    ent_coef: float = 0.01
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip (0 = no clipping, as in the authors' RLlib config)."""
    vf_loss_clip: float = 0.0
    """If > 0, clip the squared value error at this value (RLlib's vf_clip_param; the value
    change is then not clipped). 0 = PPO's value clipping by --clip-eps (PureJaxRL)."""
    kl_coeff: float = 0.0
    """Initial coefficient of a KL(old || new) penalty, adapted after every update toward
    --kl-target (x1.5 above 2x target, x0.5 below target/2; RLlib). 0 = no penalty."""
    kl_target: float = 0.01
    """Target KL of the adaptive penalty."""
    adv_norm: Literal["minibatch", "batch"] = "minibatch"
    """Standardise advantages per minibatch (PureJaxRL) or over the whole batch (RLlib)."""
    num_seeds: int = 1
    """Independent seeds trained in parallel (vmapped; sharded when several devices are visible,
    over every host's devices in a run over several hosts: launch.py)."""
    seed: int = 0
    """Base random seed; seed i of the run uses key split(key(seed), num_seeds)[i]."""
    matmul_precision: Literal["highest", "high", "default"] = "highest"
    """jax's precision for float32 matmuls. highest = full float32 on every backend: acting and
    the update (different scan forms) then agree, so the update's first ratio is 1 (a GPU's
    default rounds matmul inputs to TF32, which moved it ~1e-4 on an H100). default/high trade
    that for tensor-core speed on a GPU. A CPU computes float32 in full either way."""
    eval_every: int = 10
    """Meta-RL envs (with env.eval_params): evaluate on the held-out tasks every N updates."""
    out: str = "runs/latest"
    """Output directory: config.json, metrics.csv, checkpoints/, tensorboard/, returns.png,
    params.msgpack. An existing run there is refused (see --resume, --overwrite)."""
    progress: bool = True
    """Show a live progress bar (host callbacks from inside the compiled run)."""
    checkpoint_every: int = 0
    """Updates between orbax checkpoints of the whole runner state (a run also saves at its end
    and on Ctrl-C). 0 = auto: a few minutes' work (819 updates for the default config, 8 for
    the popgym presets). See run.py for the segments the run is compiled as."""
    overwrite: bool = False
    """Replace a run already in --out (without it, that is an error: continue it with --resume)."""
    wandb: bool = False
    """Also log to Weights & Biases (`pip install wandb`; imported only when asked for)."""
    wandb_project: str = "shm-jax"
    """W&B project name."""
    wandb_name: str = ""
    """W&B run name (empty: the --out directory's name)."""
    preset: Literal["none", "popgym", "paper-popgym", "meta"] = "none"
    """Settings preset applied before the other flags: paper-popgym = the SHM authors' POPGym
    agent and RLlib PPO (the paper's setting); popgym = their PPO sizes with our agent; meta =
    PPO for continuous control (the meta-RL tasks)."""

    @property
    def mem_size(self) -> int:
        """The memory size actually used (resolves --memory-size-auto from the env's level)."""
        if not self.memory_size_auto:
            return self.memory_size
        if not self.memory.startswith("shm"):
            return 64
        for level, size in (("Easy", 128), ("Medium", 64), ("Hard", 32)):
            if level in self.env:
                return size
        return self.memory_size

    @property
    def steps_per_update(self) -> int:
        """Env steps per update per seed."""
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        """PPO updates in the run."""
        return self.total_timesteps // self.steps_per_update

    @property
    def envs_per_minibatch(self) -> int:
        """Envs (whole sequences) per minibatch."""
        return self.num_envs // self.num_minibatches


# Le et al. 2025, POPGym runs (RLlib PPO): 64 envs x 1024 steps, 30 epochs x 8 minibatches.
_PAPER_PPO_SIZES = Config(
    num_envs=64,
    num_steps=1024,
    num_epochs=30,
    num_minibatches=8,
    lr=5e-5,
    gamma=0.99,
    gae_lambda=1.0,
    clip_eps=0.2,
    ent_coef=0.0,
    vf_coef=1.0,
    max_grad_norm=0.5,
    total_timesteps=15_000_000,
    prev_action=False,
)
PRESETS: dict[str, Config] = {
    "none": Config(),
    # The paper's PPO sizes with our default agent (the same time embedding for every memory).
    "popgym": dataclasses.replace(_PAPER_PPO_SIZES, preset="popgym"),
    # The authors' POPGym agent and RLlib 2.3 PPO exactly as spec/paper_popgym.md states.
    "paper-popgym": dataclasses.replace(
        _PAPER_PPO_SIZES,
        agent="paper",
        memory_size_auto=True,
        clip_eps=0.3,
        max_grad_norm=0.0,
        vf_loss_clip=10.0,
        kl_coeff=0.2,
        kl_target=0.01,
        adv_norm="batch",
        preset="paper-popgym",
    ),
    # Continuous control (meta-RL: Wind, Point Robot): a smaller, steadier PPO step (lr 3e-4,
    # no entropy bonus, which only widens a Gaussian policy), long credit (λ 0.99), 64 envs and
    # 200-step rollouts (whole trials of both tasks), the policy's std starting at e^-0.5.
    "meta": Config(
        num_envs=64,
        num_steps=200,
        lr=3e-4,
        ent_coef=0.0,
        gae_lambda=0.99,
        log_std_init=-0.5,
        total_timesteps=1_000_000,
        preset="meta",
    ),
}


def validate(cfg: Config) -> None:
    """Check user input once, at the boundary; raise ValueError naming the bad value."""
    if cfg.memory not in shm_jax.memory_names:
        raise ValueError(
            f"unknown memory {cfg.memory!r}; choose one of {', '.join(shm_jax.memory_names)}"
        )
    if cfg.memory_method != "auto" and not cfg.memory.startswith("shm"):
        raise ValueError(
            f"--memory-method {cfg.memory_method} is for SHM memories; --memory {cfg.memory} has "
            "one form (drop the flag)"
        )
    if cfg.memory_unroll != 0 and cfg.memory != "gru":
        raise ValueError(
            f"--memory-unroll is for --memory gru; {cfg.memory} takes no unroll (drop the flag)"
        )
    if cfg.memory_unroll < 0:
        raise ValueError("--memory-unroll must be >= 1, or 0 for the backend's default")
    if cfg.calib_init != "lecun" and cfg.memory not in ("shm", "shm_single"):
        raise ValueError(
            f"--calib-init is for SHM with θ calibration (--memory shm or shm_single); "
            f"--memory {cfg.memory} has no W_c (drop the flag)"
        )
    for name in ("memory_size", "hidden", "num_envs", "num_steps", "num_epochs"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_minibatches < 1 or cfg.num_envs % cfg.num_minibatches:
        raise ValueError(
            f"--num-envs {cfg.num_envs} must divide evenly into --num-minibatches "
            f"{cfg.num_minibatches} (minibatches are split along envs)"
        )
    if cfg.num_updates < 1:
        raise ValueError(
            f"--total-timesteps {cfg.total_timesteps} is less than one update "
            f"(--num-envs x --num-steps = {cfg.steps_per_update})"
        )
    if cfg.num_seeds < 1 or cfg.eval_every < 1:
        raise ValueError("--num-seeds and --eval-every must be >= 1")
    if not (0.0 <= cfg.gamma <= 1.0 and 0.0 <= cfg.gae_lambda <= 1.0):
        raise ValueError(f"--gamma {cfg.gamma} and --gae-lambda {cfg.gae_lambda} must be in [0, 1]")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.time_embedding < 0 or cfg.time_embedding % 2:
        raise ValueError(f"--time-embedding must be an even width >= 0, got {cfg.time_embedding}")
    if not 0.0 <= cfg.paper_time_strength <= 1.0:
        raise ValueError(
            f"--paper-time-strength must be in [0, 1] (the blend's s is clamped there), "
            f"got {cfg.paper_time_strength}"
        )
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
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
    for name in ("max_grad_norm", "vf_loss_clip", "kl_coeff"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = off)")
    for name in ("memory_features", "paper_readout"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = the memory size)")
    if cfg.kl_target <= 0:
        raise ValueError(f"--kl-target must be > 0, got {cfg.kl_target}")


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


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


# The two action distributions as pure functions of the head's output (static `continuous`).


def sample_action(key, policy_out, continuous: bool):
    """Draw an action: int32 [...] (categorical) or float [..., A] (Gaussian)."""
    if continuous:
        mean, log_std = policy_out
        return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    return jax.random.categorical(key, policy_out).astype(jnp.int32)


def log_prob(policy_out, action, continuous: bool):
    """log pi(action) with shape [...]."""
    if continuous:
        mean, log_std = policy_out
        z = (action - mean) * jnp.exp(-log_std)
        return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
    logp = jax.nn.log_softmax(policy_out)
    return jnp.take_along_axis(logp, action[..., None], axis=-1)[..., 0]


def entropy(policy_out, continuous: bool):
    """Entropy of pi with shape [...]."""
    if continuous:
        mean, log_std = policy_out
        return jnp.broadcast_to(
            jnp.sum(log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e)), mean.shape[:-1]
        )
    logp = jax.nn.log_softmax(policy_out)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def kl_divergence(old_out, new_out, continuous: bool):
    """KL(old || new) of two action distributions given by their head outputs, shape [...]."""
    if continuous:
        (m0, s0), (m1, s1) = old_out, new_out
        var0, var1 = jnp.exp(2 * s0), jnp.exp(2 * s1)
        return jnp.sum(s1 - s0 + (var0 + (m0 - m1) ** 2) / (2 * var1) - 0.5, axis=-1)
    logp0, logp1 = jax.nn.log_softmax(old_out), jax.nn.log_softmax(new_out)
    return jnp.sum(jnp.exp(logp0) * (logp0 - logp1), axis=-1)


def value_loss(cfg: Config, value, old_value, targets):
    """The value loss, a scalar: RLlib's (--vf-loss-clip c > 0) is mean(min((v - target)², c));
    PureJaxRL's clips the value's change to ±clip_eps around the acting value instead."""
    if cfg.vf_loss_clip > 0:
        return jnp.minimum((value - targets) ** 2, cfg.vf_loss_clip).mean()
    value_clipped = old_value + jnp.clip(value - old_value, -cfg.clip_eps, cfg.clip_eps)
    return 0.5 * jnp.maximum((value - targets) ** 2, (value_clipped - targets) ** 2).mean()


def adapt_kl_coeff(kl_coeff, kl, target: float):
    """RLlib's update of the KL penalty after an update: x1.5 if kl > 2 target, x0.5 if kl <
    target / 2, else unchanged."""
    return jnp.where(
        kl > 2.0 * target, kl_coeff * 1.5, jnp.where(kl < 0.5 * target, kl_coeff * 0.5, kl_coeff)
    )


# ---------------------------------------------------------------------------------------------
# Environment and PPO pieces
# ---------------------------------------------------------------------------------------------


def vec_env_class():
    """The project's training vector env (batched auto-reset, episode statistics)."""
    if hasattr(envs, "VecEnv"):
        return envs.VecEnv
    return importlib.import_module("envs.core").VecEnv


class Setup(NamedTuple):
    """What `make_env_and_network` builds from a Config (static structure of a run)."""

    env: Any
    env_params: Any
    venv: Any
    network: ActorCritic | PaperAgent
    memory: nn.Module
    continuous: bool
    action_dim: int
    action_low: Any
    action_high: Any
    episode_keys: tuple[str, ...]  # the venv's returned_episode_* info keys (besides the flag)
    eval_params: Any  # held-out task params for meta-RL envs, else None


def make_env_and_network(cfg: Config) -> Setup:
    """Build env, vector env and network for `cfg`; ValueError on inconsistent input."""
    validate(cfg)
    env, env_params = envs.make(cfg.env)
    space = env.action_space(env_params)
    if isinstance(space, spaces.Discrete):
        continuous, action_dim, low, high = False, int(space.n), None, None
    elif isinstance(space, spaces.Box):
        continuous, action_dim = True, int(np.prod(space.shape))
        low, high = jnp.asarray(space.low, jnp.float32), jnp.asarray(space.high, jnp.float32)
    else:
        raise ValueError(
            f"env {cfg.env!r} has action space {type(space).__name__}; supported: Discrete, Box"
        )
    if cfg.head == "categorical" and continuous:
        raise ValueError(f"--head categorical needs a Discrete action space; {cfg.env!r} has Box")
    if cfg.head == "gaussian" and not continuous:
        raise ValueError(f"--head gaussian needs a Box action space; {cfg.env!r} has Discrete")

    venv = vec_env_class()(env, env_params, cfg.num_envs, prev_action=cfg.prev_action)
    pixel_dims = venv.pixel_dims  # 0..255 pixel values the network scales to [0, 1]
    is_shm = cfg.memory.startswith("shm")
    extra = {"method": cfg.memory_method, "theta_init": cfg.theta_init} if is_shm else {}
    if cfg.calib_init != "lecun":  # validate: only shm and shm_single have W_c
        extra["calib_init"] = cfg.calib_init
    if cfg.memory == "gru":
        extra["unroll"] = cfg.memory_unroll or None
    if cfg.agent == "paper":
        # The authors widen SHM's read-out to 1024; their GRU outputs its hidden state.
        readout = (cfg.paper_readout or None) if is_shm else None
        memory = shm_jax.make_memory(cfg.memory, size=cfg.mem_size, features=readout, **extra)
        network = PaperAgent(
            memory,
            action_dim,
            continuous,
            pixel_dims,
            time_embedding=cfg.paper_time_embedding if is_shm else "off",  # their GRU has none
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

    # The info keys are static: read them off one abstractly evaluated step.
    def one_step(key):
        obs, state = venv.reset(key)
        action = jnp.zeros((cfg.num_envs, action_dim) if continuous else (cfg.num_envs,))
        action = action.astype(jnp.float32 if continuous else jnp.int32)
        return venv.step(key, state, action)[4]

    info = jax.eval_shape(one_step, jax.random.key(0))
    episode_keys = tuple(
        k for k in sorted(info) if k.startswith("returned_episode_") and k != "returned_episode"
    )
    eval_params = env.eval_params(env_params) if hasattr(env, "eval_params") else None
    return Setup(
        env,
        env_params,
        venv,
        network,
        memory,
        continuous,
        action_dim,
        low,
        high,
        episode_keys,
        eval_params,
    )


def metric_name(info_key: str) -> str:
    """Column name of an episode metric: returned_episode_returns -> episode_return, etc."""
    name = info_key.removeprefix("returned_episode_")
    return "episode_" + {"returns": "return", "lengths": "length"}.get(name, name)


class Transition(NamedTuple):
    """One rollout step for all envs of one seed; leaves are [T, N, ...] after the scan."""

    reset: jax.Array  # [N] bool: this step starts an episode (memory is zeroed before it)
    done: jax.Array  # [N] bool: this step ended the episode (terminated or truncated)
    obs: jax.Array  # [N, obs_dim]
    aux: jax.Array  # [N] the memory's per-step randomness (SHM: θ row indices), replayed later
    action: jax.Array  # [N] int32 or [N, A] float
    log_prob: jax.Array  # [N]
    policy_out: Any  # the acting distribution's parameters (for the exact KL penalty)
    value: jax.Array  # [N]
    reward: jax.Array  # [N]
    info: dict  # [N] each: returned_episode, returned_episode_*


class RunnerState(NamedTuple):
    """Everything one seed carries from update to update."""

    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array  # [N, obs_dim] the next observation to act on
    reset: jax.Array  # [N] bool: that observation starts an episode
    carry: Any  # network carry (memory carry, step index in the episode), leaves [N, ...]
    key: jax.Array
    update: jax.Array  # int32 scalar, updates done so far
    kl_coeff: jax.Array  # float32 scalar, the adaptive KL penalty's current coefficient


def gae(
    value: jax.Array,
    reward: jax.Array,
    done: jax.Array,
    last_value: jax.Array,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016), time-major.

    value, reward, done: [T, B] (done[t] = step t ended its episode, so no bootstrap through it);
    last_value: [B], the value of the observation after step T-1.
    Returns (advantages [T, B], returns = advantages + value [T, B]).
    """
    not_done = 1.0 - done.astype(value.dtype)
    next_value = jnp.concatenate([value[1:], last_value[None]], axis=0)
    delta = reward + gamma * next_value * not_done - value

    def backward(adv_next, inp):
        delta_t, not_done_t = inp
        adv = delta_t + gamma * lam * not_done_t * adv_next
        return adv, adv

    _, adv = jax.lax.scan(backward, jnp.zeros_like(last_value), (delta, not_done), reverse=True)
    return adv, adv + value


# ---------------------------------------------------------------------------------------------
# make_train
# ---------------------------------------------------------------------------------------------


def env_action(setup: Setup, action: jax.Array) -> jax.Array:
    """What the env receives: Gaussian samples are unbounded, so they are clipped to the Box."""
    if setup.continuous:
        return jnp.clip(action, setup.action_low, setup.action_high)
    return action


def act(setup: Setup, params, carry, obs, reset, key):
    """One step for all N envs: sample the memory's aux, run one memory step, sample an action.

    obs: [N, obs_dim]; reset: [N] bool. Returns (carry, action [N] or [N, A], log_prob [N],
    value [N], aux [N], policy_out).
    """
    key_aux, key_act = jax.random.split(key)
    aux = setup.memory.sample_aux(key_aux, (1, obs.shape[0]))  # [1, N]
    carry, policy_out, value = setup.network.apply(params, carry, obs[None], reset[None], aux)
    policy_out = jax.tree.map(lambda x: x[0] if x.ndim > 1 else x, policy_out)  # drop T=1
    action = sample_action(key_act, policy_out, setup.continuous)
    logp = log_prob(policy_out, action, setup.continuous)
    if setup.continuous:  # store log_std per env, so every Transition leaf is [N, ...]
        policy_out = (policy_out[0], jnp.broadcast_to(policy_out[1], policy_out[0].shape))
    return carry, action, logp, value[0], aux[0], policy_out


def rollout(setup: Setup, runner: RunnerState, venv, num_steps: int):
    """Act for num_steps steps with `lax.scan`; returns (runner, Transition with leaves [T, N, ...])."""

    def step(runner: RunnerState, _):
        key, key_act, key_env = jax.random.split(runner.key, 3)
        carry, action, logp, value, aux, policy_out = act(
            setup, runner.params, runner.carry, runner.obs, runner.reset, key_act
        )
        obs, env_state, reward, done, info = venv.step(
            key_env, runner.env_state, env_action(setup, action)
        )
        info = {k: v for k, v in info.items() if k.startswith("returned_episode")}
        transition = Transition(
            runner.reset, done, runner.obs, aux, action, logp, policy_out, value, reward, info
        )
        runner = runner._replace(env_state=env_state, obs=obs, reset=done, carry=carry, key=key)
        return runner, transition

    return jax.lax.scan(step, runner, None, num_steps)


def make_evaluate(
    cfg: Config,
    setup: Setup,
    num_episodes: int | None = None,
    random_policy: bool = False,
    greedy: bool = False,
):
    """`evaluate(params, key) -> {metric: mean}` over `num_episodes` (default cfg.num_envs)
    episodes: that many fresh envs with fresh memory run for one episode horizon
    (`max_steps_in_episode` steps), and each env's FIRST complete episode counts, once.
    Counting every episode that finishes within the horizon would over-weight short episodes
    (on MineSweeperEasy a random policy scores -0.287 that way against -0.225 unbiased).

    The metrics are named as in metrics.csv: episode_return, episode_length and one per
    `env.episode_metrics` (e.g. episode_success), plus `episodes`, the number counted. Meta-RL
    envs are evaluated on their held-out tasks. `greedy` takes the most likely action (the
    Gaussian's mean) instead of sampling; `random_policy` acts uniformly at random (the baseline
    the summary compares with; `params` is then ignored).
    """
    n = num_episodes or cfg.num_envs
    env_params = setup.eval_params if setup.eval_params is not None else setup.env_params
    venv = vec_env_class()(setup.env, env_params, n, prev_action=cfg.prev_action)
    horizon = int(env_params.max_steps_in_episode)
    space = setup.env.action_space(env_params)

    def choose(params, carry, obs, reset, key):
        if random_policy:
            return carry, jax.vmap(space.sample)(jax.random.split(key, n))
        carry, action, _, _, _, policy_out = act(setup, params, carry, obs, reset, key)
        if greedy:
            action = policy_out[0] if setup.continuous else jnp.argmax(policy_out, -1)
        return carry, env_action(setup, action)

    def evaluate(params, key) -> dict[str, jax.Array]:
        key_reset, key = jax.random.split(key)
        obs, env_state = venv.reset(key_reset)
        carry = setup.network.initialize_carry((n,))

        def step(state, key):
            env_state, carry, obs, reset = state
            key_act, key_env = jax.random.split(key)
            carry, action = choose(params, carry, obs, reset, key_act)
            obs, env_state, _, done, info = venv.step(key_env, env_state, action)
            info = {k: v for k, v in info.items() if k.startswith("returned_episode_")}
            return (env_state, carry, obs, done), (done, info)

        state = (env_state, carry, obs, jnp.ones((n,), bool))
        _, (done, info) = jax.lax.scan(step, state, jax.random.split(key, horizon))
        first = done & (jnp.cumsum(done, axis=0) == 1)  # [T, n]: each env's first episode end
        count = first.sum()
        out = {
            metric_name(k): jnp.where(first, v, 0.0).sum() / jnp.maximum(count, 1)
            for k, v in info.items()
        }
        out["episodes"] = count
        return out

    return with_matmul_precision(cfg.matmul_precision, evaluate)


# ---------------------------------------------------------------------------------------------
# Inspection: a trained policy's episodes and the memory inside them (notebooks, experiments/)
# ---------------------------------------------------------------------------------------------


def one_seed(params, seed: int = 0):
    """One seed's params out of a run's, whose leaves are [S, ...] (`run.load_run`)."""
    return jax.tree.map(lambda x: jnp.asarray(x[seed]), params)


def replay_episode(
    cfg: Config,
    setup: Setup,
    params,
    key: jax.Array,
    num_episodes: int = 1,
    held_out: bool = False,
    greedy: bool = False,
) -> dict[str, Any]:
    """Run one seed's policy (`params` without a seed axis: `one_seed`) on one env for
    `num_episodes` consecutive episodes, from a fresh memory, acting as in training (sampled
    actions and θ rows; `greedy`: the most likely action). Meta-RL envs draw their training
    tasks, or with `held_out` the held-out ones.

    Returns numpy arrays. Per step, T steps in all (the episodes back to back):
      obs [T, obs_dim] (what the network saw), reset [T] bool (the step starts an episode: the
      memory is zeroed before it), aux [T] (the memory's per-step randomness, e.g. SHM's θ rows),
      action [T] or [T, A] (what the env received), reward [T], done [T] bool, episode [T] int
      (which episode), state (the env's state that the observation shows: a pytree, leaves
      [T, ...]).
    Per episode, named as in metrics.csv: episode_return [E], episode_length [E] and one per
      `env.episode_metrics` (e.g. episode_success). E < num_episodes only if they did not all
      end within num_episodes x max_steps_in_episode steps (the last one is then unfinished).
    """
    if not isinstance(num_episodes, int) or num_episodes < 1:
        raise ValueError(f"num_episodes must be an int >= 1, got {num_episodes!r}")
    if held_out and setup.eval_params is None:
        raise ValueError(
            f"held_out=True needs a meta-RL env (env.eval_params); {cfg.env!r} has none"
        )
    env_params = setup.eval_params if held_out else setup.env_params
    venv = vec_env_class()(setup.env, env_params, 1, prev_action=cfg.prev_action)

    @jax.jit
    def replay(params, key):
        def step(state, key):
            env_state, carry, obs, reset = state
            key_act, key_env = jax.random.split(key)
            carry, action, _, _, aux, policy_out = act(setup, params, carry, obs, reset, key_act)
            if greedy:
                action = policy_out[0] if setup.continuous else jnp.argmax(policy_out, -1)
            action = env_action(setup, action)
            next_obs, next_state, reward, done, info = venv.step(key_env, env_state, action)
            record = dict(obs=obs, reset=reset, aux=aux, action=action, reward=reward, done=done)
            record["state"] = env_state.env_state  # the state this step's observation shows
            record["info"] = {k: v for k, v in info.items() if k.startswith("returned_episode_")}
            record = jax.tree.map(lambda x: x[0], record)  # drop the one-env axis
            return (next_state, carry, next_obs, done), record

        key_reset, key = jax.random.split(key)
        obs, env_state = venv.reset(key_reset)
        state = (env_state, setup.network.initialize_carry((1,)), obs, jnp.ones((1,), bool))
        steps = num_episodes * int(env_params.max_steps_in_episode)
        return jax.lax.scan(step, state, jax.random.split(key, steps))[1]

    record = jax.device_get(replay(params, key))
    ends = np.flatnonzero(record["done"])[:num_episodes]
    T = int(ends[-1]) + 1 if len(ends) == num_episodes else len(record["done"])
    out = jax.tree.map(lambda x: np.asarray(x[:T]), record)
    out["episode"] = np.cumsum(out["reset"]) - 1
    info = out.pop("info")
    ends = ends[ends < T]
    out.update({metric_name(k): v[ends] for k, v in info.items()})
    return out


def make_memory_trace(setup: Setup, method: str = "memory_trace") -> Callable:
    """A jitted `trace(params, carry, obs [T, B, obs_dim], reset [T, B], aux [T, B])` that runs
    the network (one seed's params, network carry leaves [B, ...]) and returns (the network's
    carry after step T-1, {"M", "C", "U"} each [T, B, H, H]): the SHM layer's recurrence
    M_t = C_t ⊙ M_{t-1} + U_t on exactly the inputs the network feeds it (`SHM.memory_trace`).
    Chunks of a long replay, run one after another carrying the network carry, give the same
    numbers as one call. `method="vectors"` returns `SHM.vectors` instead (x̂_t, k_t, q_t, ...
    [T, B, ...]). ValueError if the network's memory is not an SHM layer."""
    if not isinstance(setup.memory, shm_jax.SHM):
        raise ValueError(
            f"memory_trace reads an SHM layer's M_t and C_t; this network's memory is "
            f"{type(setup.memory).__name__} (memories with an SHM layer: shm, shm_nocal, "
            f"shm_fixed, shm_single)"
        )

    @jax.jit
    def trace(params, carry, obs, reset, aux):
        found = []

        def grab(next_fun, args, kwargs, context):
            # The memory's own inputs, whatever layers come before it in the network.
            if isinstance(context.module, shm_jax.SHM) and context.method_name == "__call__":
                found.append(getattr(context.module, method)(*args, **kwargs))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            carry = setup.network.apply(params, carry, obs, reset, aux)[0]
        return carry, found[0]

    return trace


def memory_trace(setup: Setup, params, episode: dict) -> dict[str, np.ndarray]:
    """The SHM layer's M_t, C_t and U_t over a replay (`replay_episode`'s dict; its obs, reset
    and aux are read), each a numpy array [T, H, H]: M_t is the memory after step t, zeroed at
    each episode's start as the layer does. For a few episodes; `make_memory_trace` runs long
    replays in chunks."""
    trace = make_memory_trace(setup)
    carry = setup.network.initialize_carry((1,))
    inputs = (episode[k][:, None] for k in ("obs", "reset", "aux"))  # [T, 1, ...]
    _, out = trace(params, carry, *inputs)
    return {k: np.asarray(v[:, 0]) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# make_train
# ---------------------------------------------------------------------------------------------


def make_keys(cfg: Config) -> jax.Array:
    """The run's per-seed keys: [num_seeds] typed PRNG keys."""
    return jax.random.split(jax.random.key(cfg.seed), cfg.num_seeds)


@dataclasses.dataclass(frozen=True)
class Train:
    """What `make_train` returns: the run as pure, jittable functions of one config.

    `train(keys [S])` runs the whole run, `updates(init(keys), num_updates)`, in one program.
    run.py compiles `updates(runner, K, stop=num_updates)` once instead and calls it segment
    after segment, checkpointing in between; both share the one `update` function.
    """

    init: Callable[[jax.Array], RunnerState]
    """keys [S] -> the RunnerState before the first update, every leaf [S, ...]."""
    updates: Callable[..., tuple[RunnerState, dict]]
    """(runner, length, stop=None) -> (runner, metrics {name: [length, S]}): `length` updates
    in one `lax.scan`. With `stop`, updates numbered beyond `stop` are skipped (the runner
    stays, metrics are NaN), so one compiled segment also serves the run's shorter last one."""
    num_updates: int

    def __call__(self, keys: jax.Array) -> tuple[RunnerState, dict]:
        return self.updates(self.init(keys), self.num_updates)


def make_train(cfg: Config, progress: Callable[[np.ndarray, dict], None] | None = None) -> Train:
    """Build a pure `train(keys [S]) -> (final RunnerState, metrics)` for `cfg` (a `Train`).

    One `jax.jit(train)` compiles the whole run. Every RunnerState leaf gets a leading seed axis
    [S]; `metrics[name]` is [num_updates, S]. `progress(update, metrics {name: [S]})`, if given,
    is called on the host after every update through `jax.debug.callback` (for a progress bar;
    it does not change the result).
    """
    setup = make_env_and_network(cfg)
    venv, network, memory = setup.venv, setup.network, setup.memory
    N, T, M = cfg.num_envs, cfg.num_steps, cfg.num_minibatches
    continuous = setup.continuous
    evaluate = make_evaluate(cfg, setup) if setup.eval_params is not None else None

    def lr_schedule(count):
        # optax counts minibatch steps; the rate drops once per update.
        return cfg.lr * (1.0 - (count // (M * cfg.num_epochs)) / cfg.num_updates)

    adam = optax.adam(lr_schedule if cfg.anneal_lr else cfg.lr, eps=1e-5)
    if cfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adam)
    else:
        tx = optax.chain(optax.identity(), adam)  # same optimiser-state layout either way

    def init(key) -> RunnerState:
        key, key_net, key_env, key_aux = jax.random.split(key, 4)
        obs, env_state = venv.reset(key_env)  # obs: [N, obs_dim]
        carry = network.initialize_carry((N,))
        reset = jnp.ones((N,), bool)
        aux = memory.sample_aux(key_aux, (1, N))
        params = network.init(key_net, carry, obs[None], reset[None], aux)
        return RunnerState(
            params,
            tx.init(params),
            env_state,
            obs,
            reset,
            carry,
            key,
            jnp.zeros((), jnp.int32),
            jnp.asarray(cfg.kl_coeff, jnp.float32),
        )

    def loss_fn(params, kl_coeff, carry0, traj: Transition, adv, targets):
        """PPO loss on whole sequences: traj leaves [T, B, ...], carry0 leaves [B, ...].

        The memory re-runs from the rollout's carry with the rollout's resets and aux, so before
        any gradient step it reproduces the acting policy exactly.
        """
        _, policy_out, value = network.apply(params, carry0, traj.obs, traj.reset, traj.aux)
        new_logp = log_prob(policy_out, traj.action, continuous)  # [T, B]
        log_ratio = new_logp - traj.log_prob
        ratio = jnp.exp(log_ratio)

        v_loss = value_loss(cfg, value, traj.value, targets)

        if cfg.adv_norm == "minibatch":
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg1 = ratio * adv
        pg2 = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv
        policy_loss = -jnp.minimum(pg1, pg2).mean()
        ent = entropy(policy_out, continuous).mean()
        kl = kl_divergence(traj.policy_out, policy_out, continuous).mean()
        total = policy_loss + cfg.vf_coef * v_loss - cfg.ent_coef * ent
        if cfg.kl_coeff > 0:
            total = total + kl_coeff * kl
        stats = dict(
            policy_loss=policy_loss,
            value_loss=v_loss,
            entropy=ent,
            kl=kl,
            approx_kl=((ratio - 1.0) - log_ratio).mean(),  # the k3 estimator: >= 0, 0 iff equal
            clip_frac=(jnp.abs(ratio - 1.0) > cfg.clip_eps).mean(),
            ratio_dev=jnp.abs(ratio - 1.0).max(),
        )
        return total, stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(runner: RunnerState) -> tuple[RunnerState, dict]:
        """One PPO update for one seed: rollout, GAE, epochs x minibatches."""
        carry0 = runner.carry  # leaves [N, ...]: the memory before the rollout
        runner, traj = rollout(setup, runner, venv, T)  # traj leaves [T, N, ...]

        key, key_last, key_epochs = jax.random.split(runner.key, 3)
        # Bootstrap with the value of the next observation (its memory step is not kept).
        last_value = act(setup, runner.params, runner.carry, runner.obs, runner.reset, key_last)[3]
        adv, targets = gae(
            traj.value, traj.reward, traj.done, last_value, cfg.gamma, cfg.gae_lambda
        )
        if cfg.adv_norm == "batch":
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)

        def epoch(state, key_perm):
            perm = jax.random.permutation(key_perm, N)

            def split_envs(x, axis):  # [.., N, ..] -> [M, .., N/M, ..], envs in permuted order
                x = jnp.take(x, perm, axis=axis)
                x = x.reshape(x.shape[:axis] + (M, N // M) + x.shape[axis + 1 :])
                return jnp.moveaxis(x, axis, 0)

            batches = (
                jax.tree.map(lambda x: split_envs(x, 0), carry0),
                jax.tree.map(lambda x: split_envs(x, 1), (traj, adv, targets)),
            )

            def minibatch(state, batch):
                params, opt_state = state
                carry_mb, (traj_mb, adv_mb, targets_mb) = batch
                (_, stats), grads = grad_fn(
                    params, runner.kl_coeff, carry_mb, traj_mb, adv_mb, targets_mb
                )
                updates, opt_state = tx.update(grads, opt_state, params)
                stats["grad_norm"] = optax.global_norm(grads)
                params = project_params(optax.apply_updates(params, updates))
                return (params, opt_state), stats

            return jax.lax.scan(minibatch, state, batches)

        (params, opt_state), stats = jax.lax.scan(
            epoch, (runner.params, runner.opt_state), jax.random.split(key_epochs, cfg.num_epochs)
        )  # stats leaves: [epochs, minibatches]
        # RLlib adapts the penalty to the mean KL over all epochs and minibatches of the update.
        kl_coeff = adapt_kl_coeff(runner.kl_coeff, stats["kl"].mean(), cfg.kl_target)
        metrics = {k: v.mean() for k, v in stats.items() if k != "ratio_dev"}
        metrics["kl_coeff"] = runner.kl_coeff
        runner = runner._replace(
            params=params, opt_state=opt_state, key=key, update=runner.update + 1, kl_coeff=kl_coeff
        )

        # Before the first gradient step the update must score exactly the acting policy.
        metrics["ratio_dev_first"] = stats["ratio_dev"][0, 0]
        metrics["kl_first"] = stats["approx_kl"][0, 0]
        finished = traj.info["returned_episode"]
        n_finished = finished.sum()
        for k in setup.episode_keys:
            total = jnp.where(finished, traj.info[k], 0.0).sum()
            metrics[metric_name(k)] = jnp.where(n_finished > 0, total / n_finished, jnp.nan)
        metrics["episodes"] = n_finished.astype(jnp.float32)
        return runner, metrics

    def init_seeds(keys: jax.Array) -> RunnerState:
        return seed_map(keys.shape[0])(init)(keys)

    def updates(runner: RunnerState, length: int, stop: int | None = None):
        over_seeds = seed_map(runner.update.shape[0])

        def one_update(runner: RunnerState):
            runner, metrics = over_seeds(update)(runner)
            if evaluate is not None:
                # A real branch (the predicate is not batched), so the eval runs only when due.
                step = runner.update[0]
                metrics["eval_return"] = jax.lax.cond(
                    (step % cfg.eval_every == 0) | (step == cfg.num_updates),
                    lambda r: over_seeds(lambda pk: evaluate(*pk)["episode_return"])(
                        (r.params, jax.random.split(r.key[0], len(r.key)))
                    ),
                    lambda r: jnp.full(r.update.shape, jnp.nan),
                    runner,
                )
            if progress is not None:
                jax.debug.callback(progress, runner.update[0], metrics)
            return runner, metrics

        def body(runner: RunnerState, _):
            if stop is None:
                return one_update(runner)
            nan = jax.tree.map(
                lambda m: jnp.full(m.shape, jnp.nan, m.dtype), jax.eval_shape(one_update, runner)[1]
            )
            skip = lambda r: (r, nan)
            return jax.lax.cond(runner.update[0] < stop, one_update, skip, runner)

        return jax.lax.scan(body, runner, None, length)

    return Train(
        with_matmul_precision(cfg.matmul_precision, init_seeds),
        with_matmul_precision(cfg.matmul_precision, updates),
        cfg.num_updates,
    )


def with_matmul_precision(precision: str, fn: Callable) -> Callable:
    """fn traced (or run) under jax's float32 matmul `precision` (Config.matmul_precision); jax
    reads it while tracing, so the compiled program keeps it."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return wrapped


def seed_map(num_seeds: int) -> Callable:
    """How a per-seed function runs over the seed axis: `jax.lax.map` (one seed after another
    inside the same program) for one seed, and for several seeds on a single CPU device;
    `jax.vmap` otherwise (seeds sharded over devices). Under `vmap` the VecEnv's `lax.switch`
    (reset nothing / a few / all) becomes a select that computes every branch, which made one
    vmapped seed 2.6x slower; and jax 0.10.2's CPU runtime was seen to hang on vmapped seeds
    (3 seeds, reproducibly)."""
    if num_seeds == 1 or (len(jax.devices()) == 1 and jax.default_backend() == "cpu"):
        return lambda f: lambda xs: jax.lax.map(f, xs)
    return jax.vmap


def main(argv: list[str] | None = None) -> None:
    """`python train.py [flags]`: the run's lifecycle and the CLI live in run.py."""
    import run

    run.main(argv)


if __name__ == "__main__":
    main()
