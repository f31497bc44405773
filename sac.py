"""Recurrent soft actor-critic for memory agents, compiled whole: SAC (Haarnoja et al. 2018) for
Box actions, SAC-D (Christodoulou 2019) for Discrete ones. It shares train.py's envs, every
memory of `shm_jax.make_memory` and the run's lifecycle (run.py: segments, checkpoints, exact
resume, Ctrl-C, metrics.csv, TensorBoard, --eval, the CLI).

    python sac.py --env Wind-50-150 --memory shm --preset meta-wind --num-seeds 5 --out runs/wind
    python sac.py --resume runs/wind             # continue it after Ctrl-C
    python sac.py --eval runs/wind --greedy      # held-out-task return of the mean action

The learner is the SHM authors' (thaihungle/SHM `pomdp-baselines/policies/models/policy_rnn.py`,
`policies/rl/{sac,sacd}.py`), written here from the papers' math:

- An iteration runs `rollouts_per_iter` envs for one whole episode each (one trial of a meta-RL
  task), adds the episodes to a replay buffer of whole episodes, then makes `updates_per_iter`
  gradient updates, each on `batch_size` episodes drawn uniformly. The first `random_rollouts`
  episodes act uniformly at random, and their iterations train nothing.
- Networks: a recurrent actor and a recurrent critic with two Q heads, each with its own memory
  (the authors' "separate" agent). Both read (o_t, a_{t-1}, r_{t-1}), each embedded by a
  Dense + ReLU layer, through the memory from a zero state at the episode's start; the heads
  see the memory's output and a shortcut embedding of o_t (and, in SAC's critic, of a_t).
- Every sampled episode is replayed from its first step through all three memories (actor,
  critic, target critic); losses are masked means over the steps the episode had.
- Each update: the critic step on y_t = r_t + γ (1 - d_t) V̄(h_{t+1}) (`td_target`), then the
  actor step against the updated critic, Polyak averaging of the target critic, then the
  temperature step (the authors' order).
- Terminal flags d_t: an env's `terminated`; a time limit bootstraps. `terminal_at_goal` (the
  meta presets) also stores every rewarded step as terminal, as the authors' meta-RL learner
  does (`is_goal_state`, varibad's practice) while the trial goes on.

The replay buffer is flashbax's item buffer (`fbx.make_item_buffer`), one item per episode: its
state is a pytree in the RunnerState, so orbax checkpoints it with everything else and a resumed
run continues bit-identically. An item is an `Episode`: per step float32 obs (uint8 for pixel
envs such as Visual Match), the action (float32 [A] or int32), float32 reward, bool terminal and
bool valid, plus the obs after the last step. That is 4·obs_dim + 4·A + 6 bytes per step
(Wind, obs 2 and A 2: 22 B, so 1e6 steps take 22 MB per seed; Point Robot 26 B; Visual Match
obs 75 pixels: 85 B). The buffer holds min(buffer_size, the steps the whole run collects)
(and at least one batch): a buffer that would never fill is not allocated.

SHM's random θ rows (`aux`) are drawn afresh for every replay, as the authors' torch layer does;
SAC is off-policy, so nothing of the acting draw is kept.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python sac.py ...` hands over to run.py's CLI, which imports this file back as the
    # module `sac`: the file is loaded once, as `sac`, never a second time as `__main__`.
    import importlib

    import launch

    launch.start_from_command_line()  # before gymnax's import starts jax's backend
    importlib.import_module("run").main(algo="sac")
    raise SystemExit

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import flashbax as fbx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import envs
import shm_jax
from train import Train, action_spec, scan_updates, seed_map

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

CONTINUOUS_PRESETS = ("meta-wind", "meta-pointrobot")
DISCRETE_PRESETS = ("credit",)


@dataclasses.dataclass(frozen=True)
class Config:
    """Recurrent SAC (Box actions) / SAC-D (Discrete actions) with a memory module.

    Also: `python sac.py --resume DIR` continues a run, `--eval DIR` evaluates one, `--list`
    prints every env id and memory name (run.py).
    """

    algorithm: Literal["sac"] = "sac"
    """Which trainer wrote the run (run.py picks this module by it); fixed."""
    env: str = "Pendulum-v1"
    """Environment id: any of `envs.registered` or a gymnax id (`python sac.py --list`)."""
    memory: str = "shm"
    """The critic's memory (and the actor's, unless --actor-memory), any of `shm_jax.memory_names`."""
    actor_memory: str = ""
    """The actor's memory ("" = --memory). The SHM authors' code runs a GRU actor whatever
    seq_model says (`recurrent_actor.py`: `encoder = GRU_name`); `--actor-memory gru` does that."""
    memory_size: int = 0
    """Memory size (`shm_jax.make_memory`'s: H for SHM, hidden units for the GRU). 0 = the
    authors': 24 for SHM and mLSTM, 128 FFM, 64 FWP, 512 S6, --memory-features for the GRU and
    LRU. Applies to --memory; an --actor-memory gets its own 0."""
    memory_features: int = 64
    """The memory's output width (the authors' rnn_hidden_size: 64 Wind, 128 Point Robot)."""
    theta_init: Literal["xavier", "xavier_abs"] = "xavier_abs"
    """SHM: initialisation of Θ (`shm_jax.SHM.theta_init`); xavier = the paper's."""
    calib_init: Literal["lecun", "zeros"] = "zeros"
    """SHM: initialisation of W_c (`shm_jax.SHM.calib_init`); lecun = the paper's."""
    memory_clamp: float = 0.0
    """SHM: clip M to ±this after every step, as the authors' torch layer does with 100 (0 = off;
    a clamp runs SHM's sequential form, slower than the fused kernels)."""
    obs_embed: int = 32
    """Width of the observation embedding (Dense + ReLU) and of the actor's shortcut."""
    action_embed: int = 8
    """Width of the previous action's embedding (0 = the memory does not see it)."""
    reward_embed: int = 8
    """Width of the previous reward's embedding (0 = the memory does not see it)."""
    hidden: int = 128
    """Width of the actor's and each Q head's hidden ReLU layers."""
    hidden_layers: int = 2
    """Hidden layers of the actor and of each Q head."""
    lr: float = 3e-4
    """Adam learning rate of the actor, the critic and the temperature."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak rate of the target critic: θ̄ <- (1 - τ) θ̄ + τ θ after every update."""
    learn_alpha: bool = True
    """Learn the temperature α toward --target-entropy (SAC's automatic tuning); else fixed."""
    alpha_init: float = 1.0
    """α at the start (log α = 0, α = 1, as the authors start); the fixed α without --learn-alpha."""
    target_entropy: float | None = None
    """Entropy target of the learned α. None: -|A| for SAC (Haarnoja et al. 2018b),
    0.98 log|A| for SAC-D (Christodoulou 2019)."""
    terminal_at_goal: bool = False
    """Store every rewarded step as terminal (no bootstrap) although the episode goes on: the
    authors' meta-RL learner does so at the goal (`is_goal_state`; the rewarded steps of the
    sparse meta tasks). The meta presets set it."""
    batch_size: int = 8
    """Episodes per gradient update."""
    buffer_size: int = 1_000_000
    """Replay buffer capacity in env steps (whole episodes of the env's horizon)."""
    rollouts_per_iter: int = 4
    """Episodes collected per iteration (that many envs, one episode each)."""
    random_rollouts: int = 4
    """Episodes collected with uniformly random actions before training (rounded up to whole
    iterations, which make no updates)."""
    num_iters: int = 30
    """Training iterations after the random ones."""
    updates_per_iter: int = 10
    """Gradient updates per training iteration."""
    update_ratio: float = 0.0
    """If > 0: gradient updates per env step collected (Memory-RL's 0.25); overrides
    --updates-per-iter with ceil(ratio x env steps per iteration)."""
    eval_every: int = 4
    """Meta-RL envs (with env.eval_params): evaluate the mean action on held-out tasks every N
    iterations (and after the last)."""
    eval_episodes: int = 100
    """Episodes (held-out tasks) per evaluation."""
    num_seeds: int = 1
    """Independent seeds trained in one program (`seed_map`)."""
    seed: int = 0
    """Base random seed; seed i uses key split(key(seed), num_seeds)[i]."""
    out: str = "runs/latest"
    """Output directory (run.py): config.json, metrics.csv, checkpoints/, tensorboard/, ..."""
    progress: bool = True
    """Show a live progress bar."""
    checkpoint_every: int = 0
    """Iterations between orbax checkpoints of the whole runner state, buffer included (0 = auto:
    a few minutes' work)."""
    overwrite: bool = False
    """Replace a run already in --out."""
    wandb: bool = False
    """Also log to Weights & Biases."""
    wandb_project: str = "shm-jax"
    """W&B project name."""
    wandb_name: str = ""
    """W&B run name (empty: the --out directory's name)."""
    preset: Literal["none", "meta-wind", "meta-pointrobot", "credit"] = "none"
    """Settings preset applied before the other flags: meta-wind / meta-pointrobot = the SHM
    authors' pomdp-baselines configs (SAC); credit = Memory-RL's SAC-D for Visual Match and
    Key-to-Door. none = a tiny run (about a minute on a CPU)."""

    @property
    def mem_size(self) -> int:
        """The critic memory's size (resolves --memory-size 0)."""
        return self.memory_size or default_size(self.memory, self.memory_features)

    @property
    def horizon(self) -> int:
        """L, the env's episode length limit: the length of every stored episode."""
        return env_horizon(self.env)

    @property
    def random_iters(self) -> int:
        """Iterations that act at random and train nothing."""
        return -(-self.random_rollouts // self.rollouts_per_iter)

    @property
    def num_updates(self) -> int:
        """Iterations in the run (run.py's "updates": one row of metrics.csv each)."""
        return self.random_iters + self.num_iters

    @property
    def steps_per_update(self) -> int:
        """Env steps per iteration per seed."""
        return self.rollouts_per_iter * self.horizon

    @property
    def grad_updates(self) -> int:
        """Gradient updates per training iteration."""
        if self.update_ratio > 0:
            return max(1, math.ceil(self.update_ratio * self.steps_per_update))
        return self.updates_per_iter

    @property
    def buffer_episodes(self) -> int:
        """Episodes the buffer holds: min(buffer_size, the run's episodes), at least one batch
        and one iteration's."""
        total = self.num_updates * self.rollouts_per_iter
        return max(min(self.buffer_size // self.horizon, total), self.batch_size)


# The SHM authors' memory sizes in their meta-RL runs (thaihungle/SHM `pomdp-baselines/torchkit/
# {shm,xlstm,ffm,fwp,mamba}.py`), as `shm_jax.make_memory` sizes; a GRU's is its output width.
AUTHORS_SIZES = {"shm": 24, "mlstm": 24, "ffm": 128, "fwp": 64, "s6": 512}


def default_size(memory: str, features: int) -> int:
    """The authors' size of a memory (SHM variants: 24), else `features` (the GRU's hidden)."""
    return AUTHORS_SIZES.get("shm" if memory.startswith("shm") else memory, features)


@functools.cache
def env_horizon(env_id: str) -> int:
    """max_steps_in_episode of an env id (ValueError for an unknown id)."""
    _, params = envs.make(env_id)
    return int(params.max_steps_in_episode)


PRESETS: dict[str, Config] = {
    "none": Config(),
    # thaihungle/SHM pomdp-baselines/configs/meta/wind_{50_150,10_190}/shm.yml: 500 iterations
    # of 10 rollouts and 500 updates after 100 random rollouts (510k env steps, 250k updates).
    "meta-wind": Config(
        env="Wind-50-150",
        memory_features=64,
        obs_embed=32,
        action_embed=8,
        reward_embed=0,
        hidden=128,
        gamma=0.9,
        terminal_at_goal=True,
        batch_size=64,
        buffer_size=1_000_000,
        rollouts_per_iter=10,
        random_rollouts=100,
        num_iters=500,
        updates_per_iter=500,
        eval_every=4,
        preset="meta-wind",
    ),
    # .../point_robot_{50_150,10_190}/shm.yml: 200 iterations of 25 rollouts (2 episodes each)
    # and 1000 updates after 400 random rollouts (1.08M env steps, 200k updates).
    "meta-pointrobot": Config(
        env="PointRobot-50-150",
        memory_features=128,
        obs_embed=32,
        action_embed=0,
        reward_embed=8,
        hidden=128,
        gamma=0.9,
        terminal_at_goal=True,
        batch_size=32,
        buffer_size=4_000_000,
        rollouts_per_iter=25,
        random_rollouts=400,
        num_iters=200,
        updates_per_iter=1000,
        eval_every=4,
        preset="meta-pointrobot",
    ),
    # twni2016/Memory-RL configs/rl/sacd_default.py and main.py: fixed α 0.1, γ 0.99, 256-256
    # heads, 64 episodes a batch, 0.25 updates per env step, 10 random episodes first, 1e6 steps
    # of replay; budget.py: 15,000 episodes for Visual Match 250 (our 4 a iteration).
    "credit": Config(
        env="VisualMatch-250",
        memory_features=128,
        obs_embed=32,
        action_embed=16,
        reward_embed=0,
        hidden=256,
        gamma=0.99,
        learn_alpha=False,
        alpha_init=0.1,
        batch_size=64,
        buffer_size=1_000_000,
        rollouts_per_iter=4,
        random_rollouts=12,
        num_iters=3750,
        update_ratio=0.25,
        preset="credit",
    ),
}


def validate(cfg: Config) -> None:
    """Check the settings that need no env; ValueError naming the bad value."""
    for name in ("memory", "actor_memory"):
        value = getattr(cfg, name)
        if value and value not in shm_jax.memory_names:
            raise ValueError(
                f"unknown --{name.replace('_', '-')} {value!r}; choose one of "
                f"{', '.join(shm_jax.memory_names)}"
            )
    positive = ("memory_features", "obs_embed", "hidden", "batch_size", "buffer_size")
    positive += ("rollouts_per_iter", "num_iters", "eval_every", "eval_episodes", "num_seeds")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("memory_size", "action_embed", "reward_embed", "hidden_layers", "random_rollouts"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.updates_per_iter < 1 and cfg.update_ratio <= 0:
        raise ValueError("--updates-per-iter must be >= 1 (or give --update-ratio > 0)")
    if cfg.update_ratio < 0 or cfg.memory_clamp < 0:
        raise ValueError("--update-ratio and --memory-clamp must be >= 0")
    if not (0.0 <= cfg.gamma <= 1.0 and 0.0 < cfg.tau <= 1.0):
        raise ValueError(f"--gamma {cfg.gamma} must be in [0, 1] and --tau {cfg.tau} in (0, 1]")
    if cfg.lr <= 0 or cfg.alpha_init <= 0:
        raise ValueError(f"--lr ({cfg.lr}) and --alpha-init ({cfg.alpha_init}) must be > 0")
    if cfg.memory_clamp and not cfg.memory.startswith("shm"):
        raise ValueError(f"--memory-clamp is for SHM memories; --memory is {cfg.memory}")


# ---------------------------------------------------------------------------------------------
# The policy's distributions and SAC's losses, as pure functions
# ---------------------------------------------------------------------------------------------

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the authors' clamp of the Gaussian's log std


def tanh_gaussian_log_prob(u, mean, log_std):
    """log π(a) of a = tanh(u), u ~ N(mean, exp(log_std)²) per component, summed over [..., A]:
    log N(u) - Σ log(1 - tanh²(u)) (Haarnoja et al. 2018, appendix C), the correction written
    as 2 (log 2 - u - softplus(-2u)), which stays finite where tanh(u) rounds to ±1."""
    z = (u - mean) * jnp.exp(-log_std)
    gauss = -0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
    log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.sum(gauss - log_det, axis=-1)


def tanh_gaussian_sample(key, mean, log_std):
    """A reparameterised sample a = tanh(mean + σ ε) in (-1, 1)^A and its log π(a) [...]."""
    u = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    return jnp.tanh(u), tanh_gaussian_log_prob(u, mean, log_std)


def soft_value(q1, q2, log_pi, alpha):
    """SAC's V(h) = min(Q1, Q2)(h, a') - α log π(a'|h) for one sampled a' (shapes [...])."""
    return jnp.minimum(q1, q2) - alpha * log_pi


def soft_value_discrete(q1, q2, logits, alpha):
    """SAC-D's V(h) = Σ_a π(a|h) (min(Q1, Q2)(h, a) - α log π(a|h)), the expectation in closed
    form (Christodoulou 2019, eq. 10). q1, q2, logits: [..., A]; returns [...]."""
    log_pi = jax.nn.log_softmax(logits)
    return jnp.sum(jnp.exp(log_pi) * (jnp.minimum(q1, q2) - alpha * log_pi), axis=-1)


def td_target(reward, terminal, next_value, gamma: float):
    """y_t = r_t + γ (1 - d_t) V̄(h_{t+1}) (shapes [...]); no gradient flows into it."""
    return jax.lax.stop_gradient(reward + gamma * (1.0 - terminal) * next_value)


def masked_mean(x, mask):
    """Σ mask·x / max(Σ mask, 1): the mean over the steps that exist."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def critic_loss(q1, q2, target, mask):
    """Σ_i mean_t (Q_i(h_t, a_t) - y_t)² over the valid steps (the authors' qf1_loss + qf2_loss)."""
    return masked_mean((q1 - target) ** 2, mask) + masked_mean((q2 - target) ** 2, mask)


def actor_loss(q1, q2, log_pi, alpha, mask):
    """SAC's policy loss mean_t (α log π(ã_t|h_t) - min(Q1, Q2)(h_t, ã_t)), ã_t ~ π
    reparameterised (Haarnoja et al. 2018, eq. 12)."""
    return masked_mean(alpha * log_pi - jnp.minimum(q1, q2), mask)


def actor_loss_discrete(q1, q2, logits, alpha, mask):
    """SAC-D's policy loss mean_t Σ_a π(a|h_t) (α log π(a|h_t) - min(Q1, Q2)(h_t, a))
    (Christodoulou 2019, eq. 12); q1, q2 carry no gradient."""
    log_pi = jax.nn.log_softmax(logits)
    q = jax.lax.stop_gradient(jnp.minimum(q1, q2))
    return masked_mean(jnp.sum(jnp.exp(log_pi) * (alpha * log_pi - q), axis=-1), mask)


def temperature_loss(log_alpha, mean_log_pi, target_entropy: float):
    """J(α) = -α (E[log π] + H̄) (Haarnoja et al. 2018b, eq. 18), α = exp(log α), with the
    policy's mean log-probability held fixed; its gradient raises α while the entropy is below H̄."""
    return -jnp.exp(log_alpha) * (jax.lax.stop_gradient(mean_log_pi) + target_entropy)


def polyak(target, online, tau: float):
    """θ̄ <- (1 - τ) θ̄ + τ θ, leaf by leaf."""
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def _small(scale: float) -> Callable:
    """U(-scale, scale): the authors' last layers start near zero (Q ≈ 0, π near uniform)."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -scale, scale
    )


def embed_inputs(obs, prev_action, prev_reward, sizes: tuple[int, int, int], pixel_dims: int):
    """The memory's input: Dense + ReLU embeddings of o_t, a_{t-1}, r_{t-1}, concatenated
    [T, B, Σ sizes] (a 0 size leaves that input out), and the float obs [T, B, obs_dim] with
    its leading `pixel_dims` components scaled from 0..255 to [0, 1]. Call inside a compact
    module."""
    x = obs.astype(jnp.float32)
    if pixel_dims:
        x = x.at[..., :pixel_dims].multiply(1.0 / 255.0)
    obs_size, action_size, reward_size = sizes
    parts = [nn.relu(nn.Dense(obs_size, name="obs_embed")(x))]
    if action_size:
        parts.append(nn.relu(nn.Dense(action_size, name="action_embed")(prev_action)))
    if reward_size:
        parts.append(nn.relu(nn.Dense(reward_size, name="reward_embed")(prev_reward[..., None])))
    return jnp.concatenate(parts, axis=-1), x


def mlp(x, width: int, layers: int, out: int, out_scale: float, name: str):
    """`layers` ReLU layers of `width`, then a linear layer of `out` starting near zero."""
    for i in range(layers):
        x = nn.relu(nn.Dense(width, name=f"{name}_{i}")(x))
    return nn.Dense(out, kernel_init=_small(out_scale), bias_init=_small(out_scale), name=name)(x)


class Actor(nn.Module):
    """π(a_t | o_{≤t}, a_{<t}, r_{<t}), time-major: `__call__(carry, obs [T, B, d], prev_action
    [T, B, A], prev_reward [T, B], resets [T, B], aux [T, B]) -> (carry, policy_out)` with
    policy_out = (mean, log_std) [T, B, A] of the pre-tanh Gaussian, or logits [T, B, A]."""

    memory: nn.Module
    action_dim: int
    continuous: bool
    sizes: tuple[int, int, int]  # obs, action, reward embedding widths
    hidden: int
    hidden_layers: int
    pixel_dims: int = 0

    def initialize_carry(self, batch_shape: tuple[int, ...]):
        return self.memory.initialize_carry(batch_shape)

    @nn.compact
    def __call__(self, carry, obs, prev_action, prev_reward, resets, aux):
        z, x = embed_inputs(obs, prev_action, prev_reward, self.sizes, self.pixel_dims)
        carry, y = self.memory(carry, z, resets, aux)
        shortcut = nn.relu(nn.Dense(self.sizes[0], name="shortcut")(x))
        h = jnp.concatenate([y, shortcut], axis=-1)
        A = self.action_dim
        if not self.continuous:
            return carry, mlp(h, self.hidden, self.hidden_layers, A, 1e-3, "logits")
        out = mlp(h, self.hidden, self.hidden_layers, 2 * A, 1e-3, "gaussian")
        return carry, (out[..., :A], jnp.clip(out[..., A:], LOG_STD_MIN, LOG_STD_MAX))


class Critic(nn.Module):
    """Twin Q heads on one memory, time-major: `__call__(carry, obs, prev_action, prev_reward,
    resets, aux, action) -> (carry, (q1, q2))`; SAC: action [T, B, A] in (-1, 1), q [T, B];
    SAC-D: action None, q [T, B, A] (one value per action)."""

    memory: nn.Module
    action_dim: int
    continuous: bool
    sizes: tuple[int, int, int]
    hidden: int
    hidden_layers: int
    pixel_dims: int = 0

    def initialize_carry(self, batch_shape: tuple[int, ...]):
        return self.memory.initialize_carry(batch_shape)

    @nn.compact
    def __call__(self, carry, obs, prev_action, prev_reward, resets, aux, action=None):
        z, x = embed_inputs(obs, prev_action, prev_reward, self.sizes, self.pixel_dims)
        carry, y = self.memory(carry, z, resets, aux)
        current = jnp.concatenate([x, action], axis=-1) if self.continuous else x
        shortcut = nn.relu(nn.Dense(z.shape[-1], name="shortcut")(current))
        h = jnp.concatenate([y, shortcut], axis=-1)
        out = 1 if self.continuous else self.action_dim
        q1 = mlp(h, self.hidden, self.hidden_layers, out, 3e-3, "q1")
        q2 = mlp(h, self.hidden, self.hidden_layers, out, 3e-3, "q2")
        if self.continuous:
            q1, q2 = q1[..., 0], q2[..., 0]
        return carry, (q1, q2)


def make_memory(cfg: Config, name: str, size: int) -> nn.Module:
    """A memory from `shm_jax.make_memory` with the config's SHM knobs."""
    extra: dict[str, Any] = {}
    if name.startswith("shm"):
        extra["theta_init"] = cfg.theta_init
        if name in ("shm", "shm_single"):  # the memories with W_c
            extra["calib_init"] = cfg.calib_init
        if cfg.memory_clamp > 0:
            extra["clamp"] = cfg.memory_clamp
    return shm_jax.make_memory(name, size=size, features=cfg.memory_features, **extra)


# ---------------------------------------------------------------------------------------------
# Environment, episodes, replay buffer
# ---------------------------------------------------------------------------------------------


class Setup(NamedTuple):
    """What `make_env_and_network` builds from a Config (the static structure of a run)."""

    env: Any
    env_params: Any
    eval_params: Any  # held-out task params for meta-RL envs, else None
    actor: Actor
    critic: Critic
    memory: nn.Module  # the critic's memory (run.py reports its state size)
    actor_memory: nn.Module
    continuous: bool
    action_dim: int
    action_low: Any
    action_high: Any
    obs_dim: int
    pixel_dims: int
    horizon: int  # L: every episode is stored as L steps (masked past its end)
    target_entropy: float
    buffer: Any  # the flashbax item buffer of Episodes


class Episode(NamedTuple):
    """One stored episode, steps t = 0 .. L-1 (the env's horizon); leaves gain [N] or [B] axes.
    Steps after the episode's end are zeros with valid False."""

    obs: jax.Array  # [L + 1, obs_dim] float32 (uint8 for pixel envs): o_t, and o_L after the end
    action: jax.Array  # [L, A] float32 in (-1, 1) (SAC) or [L] int32 (SAC-D)
    reward: jax.Array  # [L] float32
    terminal: jax.Array  # [L] bool: no bootstrap after step t
    valid: jax.Array  # [L] bool: step t belongs to the episode


def make_env_and_network(cfg: Config) -> Setup:
    """Build the env, the networks and the buffer for `cfg`; ValueError on inconsistent input
    (everything is checked here, before anything is compiled)."""
    validate(cfg)
    env, env_params = envs.make(cfg.env)
    continuous, action_dim, low, high = action_spec(env, env_params, cfg.env)
    if continuous:
        low, high = (jnp.broadcast_to(b, (action_dim,)) for b in (low, high))
    if continuous and cfg.preset in DISCRETE_PRESETS:
        raise ValueError(
            f"--preset {cfg.preset} is SAC-D for Discrete actions; {cfg.env!r} has Box actions "
            f"(use --preset {' or '.join(CONTINUOUS_PRESETS)})"
        )
    if not continuous and cfg.preset in CONTINUOUS_PRESETS:
        raise ValueError(
            f"--preset {cfg.preset} is SAC for Box actions; {cfg.env!r} has Discrete actions "
            f"(use --preset {' or '.join(DISCRETE_PRESETS)})"
        )
    L = int(env_params.max_steps_in_episode)
    if cfg.buffer_size < L:
        raise ValueError(
            f"--buffer-size {cfg.buffer_size} holds no whole episode of {cfg.env} ({L} steps)"
        )
    held = cfg.buffer_size // L
    if held < max(cfg.batch_size, cfg.rollouts_per_iter):
        raise ValueError(
            f"--buffer-size {cfg.buffer_size} holds {held} episodes of {cfg.env} ({L} steps): "
            f"fewer than one batch (--batch-size {cfg.batch_size}) or one iteration's "
            f"(--rollouts-per-iter {cfg.rollouts_per_iter})"
        )
    obs_space = env.observation_space(env_params)
    obs_dim = int(np.prod(obs_space.shape))
    pixels = getattr(env, "pixel_observations", False) or obs_space.dtype == jnp.uint8
    pixel_dims = obs_dim if pixels else 0

    critic_memory = make_memory(cfg, cfg.memory, cfg.mem_size)
    actor_name = cfg.actor_memory or cfg.memory
    actor_size = cfg.mem_size if actor_name == cfg.memory else 0
    actor_memory = make_memory(
        cfg, actor_name, actor_size or default_size(actor_name, cfg.memory_features)
    )
    sizes = (cfg.obs_embed, cfg.action_embed, cfg.reward_embed)
    common = dict(
        action_dim=action_dim,
        continuous=continuous,
        sizes=sizes,
        hidden=cfg.hidden,
        hidden_layers=cfg.hidden_layers,
        pixel_dims=pixel_dims,
    )
    actor = Actor(actor_memory, **common)
    critic = Critic(critic_memory, **common)
    if cfg.target_entropy is not None:
        target_entropy = float(cfg.target_entropy)
    else:
        target_entropy = -float(action_dim) if continuous else 0.98 * math.log(action_dim)
    buffer = fbx.make_item_buffer(
        max_length=cfg.buffer_episodes,
        min_length=1,
        sample_batch_size=cfg.batch_size,
        add_batches=True,
    )
    eval_params = env.eval_params(env_params) if hasattr(env, "eval_params") else None
    return Setup(
        env,
        env_params,
        eval_params,
        actor,
        critic,
        critic_memory,
        actor_memory,
        continuous,
        action_dim,
        low,
        high,
        obs_dim,
        pixel_dims,
        L,
        target_entropy,
        buffer,
    )


def env_action(setup: Setup, action):
    """What the env receives: SAC's action in (-1, 1)^A mapped linearly onto the Box."""
    if setup.continuous:
        return setup.action_low + 0.5 * (action + 1.0) * (setup.action_high - setup.action_low)
    return action


def encode_action(setup: Setup, action):
    """The previous action as the networks read it: one-hot (SAC-D) or as is (SAC), [..., A]."""
    if setup.continuous:
        return action
    return jax.nn.one_hot(action, setup.action_dim, dtype=jnp.float32)


def run_episodes(setup: Setup, actor_params, key, env_params, n: int, mode: str, cfg: Config):
    """Run n fresh envs for one episode each (L steps, no auto-reset; masked past the end).

    mode: "random" (uniform actions, the actor is not run), "sample" (π's samples) or "greedy"
    (tanh of the mean, or the most likely action). Returns (Episode with leaves [n, ...], stats
    {episode_return, episode_length, episode_<m> for each env.episode_metrics: [n]}).
    """
    env, L = setup.env, setup.horizon
    key_reset, key = jax.random.split(key)
    obs0, state = jax.vmap(env.reset_env, in_axes=(0, None))(
        jax.random.split(key_reset, n), env_params
    )
    store = jnp.uint8 if setup.pixel_dims == setup.obs_dim and setup.pixel_dims else jnp.float32
    obs0 = obs0.reshape(n, -1).astype(jnp.float32)
    A = setup.action_dim
    metric_names = tuple(getattr(env, "episode_metrics", ()))

    def choose(carry, obs, prev_action, prev_reward, first, key):
        key_aux, key_act = jax.random.split(key)
        if mode == "random":
            if setup.continuous:
                return carry, jax.random.uniform(key_act, (n, A), minval=-1.0, maxval=1.0)
            return carry, jax.random.randint(key_act, (n,), 0, A)
        aux = setup.actor_memory.sample_aux(key_aux, (1, n))
        carry, out = setup.actor.apply(
            actor_params, carry, obs[None], prev_action[None], prev_reward[None], first[None], aux
        )
        out = jax.tree.map(lambda x: x[0], out)
        if setup.continuous:
            mean, log_std = out
            if mode == "greedy":
                return carry, jnp.tanh(mean)
            return carry, tanh_gaussian_sample(key_act, mean, log_std)[0]
        if mode == "greedy":
            return carry, jnp.argmax(out, axis=-1).astype(jnp.int32)
        return carry, jax.random.categorical(key_act, out).astype(jnp.int32)

    def step(state, key):
        env_state, carry, obs, prev_action, prev_reward, first, alive = state
        key_act, key_env = jax.random.split(key)
        carry, action = choose(carry, obs, prev_action, prev_reward, first, key_act)
        next_obs, env_state, reward, terminated, info = jax.vmap(
            env.step_env, in_axes=(0, 0, 0, None)
        )(jax.random.split(key_env, n), env_state, env_action(setup, action), env_params)
        truncated = jax.vmap(env.is_truncated, in_axes=(0, None))(env_state, env_params)
        reward = jnp.asarray(reward, jnp.float32).reshape(n) * alive
        terminated = jnp.asarray(terminated, bool).reshape(n)
        done = terminated | truncated
        terminal = terminated | (cfg.terminal_at_goal & (reward > 0))
        ends = alive & done  # this step ends the episode
        record = (
            action,
            reward,
            terminal & alive,
            alive,
            ends,
            {m: jnp.asarray(info[m], jnp.float32).reshape(n) for m in metric_names},
        )
        next_obs = next_obs.reshape(n, -1).astype(jnp.float32)
        state = (
            env_state,
            carry,
            next_obs,
            encode_action(setup, action),
            reward,
            jnp.zeros(n, bool),
            alive & ~done,
        )
        return state, (next_obs, record)

    start = (
        state,
        setup.actor.initialize_carry((n,)),
        obs0,
        jnp.zeros((n, A), jnp.float32),
        jnp.zeros(n, jnp.float32),
        jnp.ones(n, bool),
        jnp.ones(n, bool),
    )
    _, (obs, record) = jax.lax.scan(step, start, jax.random.split(key, L))
    action, reward, terminal, valid, ends, info = record  # each [L, n, ...]
    obs = (
        jnp.concatenate([obs0[None], obs], axis=0)
        * jnp.concatenate([jnp.ones((1, n)), valid], axis=0)[..., None]
    )  # o_{t+1} kept at the last valid step t; zeros after
    time_major = Episode(obs.astype(store), action, reward, terminal, valid)
    episode = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), time_major)  # [n, L, ...]
    stats = {
        "episode_return": reward.sum(0),
        "episode_length": valid.sum(0).astype(jnp.float32),
        **{f"episode_{m}": jnp.where(ends, v, 0.0).sum(0) for m, v in info.items()},
    }
    return episode, stats


def make_evaluate(
    cfg: Config,
    setup: Setup,
    num_episodes: int | None = None,
    random_policy: bool = False,
    greedy: bool = False,
):
    """`evaluate(params, key) -> {metric: mean}` over `num_episodes` (default cfg.eval_episodes)
    fresh episodes, on the held-out tasks of a meta-RL env. Metrics as in metrics.csv
    (episode_return, episode_length, episode_<m>) plus `episodes`. `greedy`: the mean action
    (tanh μ) or the most likely one; `random_policy`: uniform actions (`params` is ignored)."""
    n = num_episodes or cfg.eval_episodes
    env_params = setup.eval_params if setup.eval_params is not None else setup.env_params
    mode = "random" if random_policy else ("greedy" if greedy else "sample")

    def evaluate(params, key) -> dict[str, jax.Array]:
        actor_params = None if random_policy else params["actor"]
        _, stats = run_episodes(setup, actor_params, key, env_params, n, mode, cfg)
        out = {k: v.mean() for k, v in stats.items()}
        out["episodes"] = jnp.asarray(n)
        return out

    return evaluate


# ---------------------------------------------------------------------------------------------
# One gradient update
# ---------------------------------------------------------------------------------------------


class RunnerState(NamedTuple):
    """Everything one seed carries from iteration to iteration (leaves gain a seed axis [S])."""

    params: dict  # {"actor", "critic", "log_alpha"}
    target: Any  # the target critic's params
    opt_state: dict  # Adam states, same keys as params
    buffer: Any  # flashbax TrajectoryBufferState of Episodes
    key: jax.Array
    update: jax.Array  # int32: iterations done


def replay_inputs(setup: Setup, batch: Episode):
    """The memories' inputs for a batch of episodes [B, L, ...]: time-major sequences of L + 1
    steps t = 0 .. L (o_t, a_{t-1}, r_{t-1}, reset), zeros before the first step, a reset at
    t = 0 only (every sequence is one episode from its start)."""
    batch = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batch)  # [L(+1), B, ...]
    L, B = batch.reward.shape
    action = encode_action(setup, batch.action)
    prev_action = jnp.concatenate([jnp.zeros((1, B, setup.action_dim)), action], axis=0)
    prev_reward = jnp.concatenate([jnp.zeros((1, B)), batch.reward], axis=0)
    resets = jnp.zeros((L + 1, B), bool).at[0].set(True)
    return batch, (batch.obs, prev_action, prev_reward, resets)


def make_update(cfg: Config, setup: Setup, tx: optax.GradientTransformation):
    """`update(params, target, opt_state, batch, key) -> (params, target, opt_state, stats)`:
    one SAC / SAC-D gradient update on a batch of episodes [B, L, ...]."""
    actor, critic, continuous = setup.actor, setup.critic, setup.continuous

    def first(inputs, n):
        return jax.tree.map(lambda x: x[:n], inputs)

    def update(params, target, opt_state, batch: Episode, key):
        batch, inputs = replay_inputs(setup, batch)
        L, B = batch.reward.shape
        mask = batch.valid.astype(jnp.float32)
        alpha = jnp.exp(params["log_alpha"])
        key_next, key_pi, key_a, key_c, key_t = jax.random.split(key, 5)
        aux_actor = setup.actor_memory.sample_aux(key_a, (L + 1, B))
        aux_critic = setup.memory.sample_aux(key_c, (L + 1, B))
        aux_target = setup.memory.sample_aux(key_t, (L + 1, B))
        carry_actor = actor.initialize_carry((B,))
        carry_critic = critic.initialize_carry((B,))

        # Critic: y_t from the target critic at h_{t+1} with a' ~ π(·|h_{t+1}), t + 1 = 1 .. L.
        _, pi_next = actor.apply(params["actor"], carry_actor, *inputs, aux_actor)
        if continuous:
            a_next, log_pi_next = tanh_gaussian_sample(key_next, *pi_next)
            _, (q1_next, q2_next) = critic.apply(target, carry_critic, *inputs, aux_target, a_next)
            v_next = soft_value(q1_next, q2_next, log_pi_next, alpha)
        else:
            _, (q1_next, q2_next) = critic.apply(target, carry_critic, *inputs, aux_target)
            v_next = soft_value_discrete(q1_next, q2_next, pi_next, alpha)
        y = td_target(batch.reward, batch.terminal.astype(jnp.float32), v_next[1:], cfg.gamma)
        now = first(inputs, L)  # steps t = 0 .. L-1, the ones with actions

        def critic_loss_fn(critic_params):
            if continuous:
                _, (q1, q2) = critic.apply(
                    critic_params, carry_critic, *now, aux_critic[:L], batch.action
                )
            else:
                _, (q1, q2) = critic.apply(critic_params, carry_critic, *now, aux_critic[:L])
                pick = lambda q: jnp.take_along_axis(q, batch.action[..., None], -1)[..., 0]
                q1, q2 = pick(q1), pick(q2)
            return critic_loss(q1, q2, y, mask), masked_mean(q1, mask)

        (c_loss, q_mean), c_grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            params["critic"]
        )
        updates, c_opt = tx.update(c_grads, opt_state["critic"], params["critic"])
        critic_params = optax.apply_updates(params["critic"], updates)

        # Actor, against the updated critic.
        if not continuous:
            _, (q1_pi, q2_pi) = critic.apply(critic_params, carry_critic, *now, aux_critic[:L])

        def actor_loss_fn(actor_params):
            _, pi = actor.apply(actor_params, carry_actor, *now, aux_actor[:L])
            if continuous:
                a, log_pi = tanh_gaussian_sample(key_pi, *pi)
                _, (q1, q2) = critic.apply(critic_params, carry_critic, *now, aux_critic[:L], a)
                return actor_loss(q1, q2, log_pi, alpha, mask), masked_mean(log_pi, mask)
            log_pi = jax.nn.log_softmax(pi)
            mean_log_pi = masked_mean(jnp.sum(jnp.exp(log_pi) * log_pi, -1), mask)
            return actor_loss_discrete(q1_pi, q2_pi, pi, alpha, mask), mean_log_pi

        (a_loss, mean_log_pi), a_grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
            params["actor"]
        )
        updates, a_opt = tx.update(a_grads, opt_state["actor"], params["actor"])
        actor_params = optax.apply_updates(params["actor"], updates)

        target = polyak(target, critic_params, cfg.tau)

        log_alpha, t_opt = params["log_alpha"], opt_state["log_alpha"]
        if cfg.learn_alpha:
            t_grad = jax.grad(temperature_loss)(log_alpha, mean_log_pi, setup.target_entropy)
            updates, t_opt = tx.update(t_grad, t_opt, log_alpha)
            log_alpha = optax.apply_updates(log_alpha, updates)

        params = {"actor": actor_params, "critic": critic_params, "log_alpha": log_alpha}
        opt_state = {"actor": a_opt, "critic": c_opt, "log_alpha": t_opt}
        stats = dict(
            critic_loss=c_loss,
            actor_loss=a_loss,
            q_mean=q_mean,
            alpha=alpha,
            entropy=-mean_log_pi,
            grad_norm=optax.global_norm(c_grads),
            actor_grad_norm=optax.global_norm(a_grads),
        )
        return params, target, opt_state, stats

    return update


# ---------------------------------------------------------------------------------------------
# make_train
# ---------------------------------------------------------------------------------------------

LEARNER_METRICS = ("critic_loss", "actor_loss", "q_mean", "alpha", "entropy", "grad_norm")
LEARNER_METRICS += ("actor_grad_norm",)


def make_keys(cfg: Config) -> jax.Array:
    """The run's per-seed keys: [num_seeds] typed PRNG keys."""
    return jax.random.split(jax.random.key(cfg.seed), cfg.num_seeds)


def make_train(cfg: Config, progress: Callable[[np.ndarray, dict], None] | None = None):
    """The run as pure functions, a `Train(init, updates, num_updates)`: `init(keys [S])`
    gives the RunnerState (leaves [S, ...]); `updates(runner, length, stop=None)` runs `length`
    iterations in one `lax.scan` (with `stop`, iterations numbered beyond it are skipped and
    their metrics are NaN), metrics {name: [length, S]}. An iteration: collect
    rollouts_per_iter episodes (at random during the first random_iters), add them to the
    buffer, then grad_updates updates (none during the random iterations), then the held-out
    evaluation when due. `progress(iteration, metrics {name: [S]})` is called on the host after
    each iteration (a progress bar)."""
    setup = make_env_and_network(cfg)
    N, K = cfg.rollouts_per_iter, cfg.grad_updates
    tx = optax.adam(cfg.lr)
    update = make_update(cfg, setup, tx)
    evaluate = make_evaluate(cfg, setup, greedy=True) if setup.eval_params is not None else None

    def init(key) -> RunnerState:
        key, key_actor, key_critic = jax.random.split(key, 3)
        obs = jnp.zeros((1, 1, setup.obs_dim))
        prev_action = jnp.zeros((1, 1, setup.action_dim))
        reward, resets = jnp.zeros((1, 1)), jnp.ones((1, 1), bool)
        aux = jnp.zeros((1, 1), jnp.int32)
        actor_params = setup.actor.init(
            key_actor, setup.actor.initialize_carry((1,)), obs, prev_action, reward, resets, aux
        )
        action = prev_action if setup.continuous else None
        critic_args = (setup.critic.initialize_carry((1,)), obs, prev_action, reward, resets, aux)
        critic_params = setup.critic.init(key_critic, *critic_args, action)
        params = {
            "actor": actor_params,
            "critic": critic_params,
            "log_alpha": jnp.asarray(math.log(cfg.alpha_init), jnp.float32),
        }
        opt_state = {k: tx.init(v) for k, v in params.items()}
        one = lambda key: run_episodes(setup, None, key, setup.env_params, 1, "random", cfg)[0]
        example = jax.tree.map(  # an empty episode: the buffer's item shapes and dtypes
            lambda x: jnp.zeros(x.shape[1:], x.dtype), jax.eval_shape(one, key)
        )
        return RunnerState(
            params,
            critic_params,
            opt_state,
            setup.buffer.init(example),
            key,
            jnp.zeros((), jnp.int32),
        )

    def collect(mode: str):
        def collect_seed(runner: RunnerState):
            key, key_run = jax.random.split(runner.key)
            episodes, stats = run_episodes(
                setup, runner.params["actor"], key_run, setup.env_params, N, mode, cfg
            )
            buffer = setup.buffer.add(runner.buffer, episodes)  # N items [N, ...]
            metrics = {k: v.mean() for k, v in stats.items()}
            metrics["episodes"] = jnp.float32(N)
            return runner._replace(buffer=buffer, key=key), metrics

        return collect_seed

    def learn(runner: RunnerState):
        key, key_updates = jax.random.split(runner.key)

        def one(state, key):
            params, target, opt_state = state
            key_sample, key_update = jax.random.split(key)
            batch = setup.buffer.sample(runner.buffer, key_sample).experience  # [B, L, ...]
            params, target, opt_state, stats = update(params, target, opt_state, batch, key_update)
            return (params, target, opt_state), stats

        state = (runner.params, runner.target, runner.opt_state)
        (params, target, opt_state), stats = jax.lax.scan(
            one, state, jax.random.split(key_updates, K)
        )
        runner = runner._replace(params=params, target=target, opt_state=opt_state, key=key)
        return runner, {k: v.mean() for k, v in stats.items()}

    def held_out_return(runner: RunnerState):
        """One seed's mean return of the mean action on held-out tasks (the key is not used up)."""
        return evaluate(runner.params, jax.random.fold_in(runner.key, 1))["episode_return"]

    def init_seeds(keys: jax.Array) -> RunnerState:
        return seed_map(keys.shape[0])(init)(keys)

    def updates(runner: RunnerState, length: int, stop: int | None = None):
        over_seeds = seed_map(runner.update.shape[0])
        S = runner.update.shape[0]

        def one_iteration(runner: RunnerState):
            # The branches' predicates come from seed 0's counter (all seeds share it), outside
            # the seed map: real branches, so the random iterations run neither actor nor updates.
            random = runner.update[0] < cfg.random_iters
            runner, metrics = jax.lax.cond(
                random, over_seeds(collect("random")), over_seeds(collect("sample")), runner
            )
            nan = {k: jnp.full((S,), jnp.nan) for k in LEARNER_METRICS}
            runner, learned = jax.lax.cond(
                random, lambda r: (r, nan), over_seeds(learn), runner
            )  # fmt: skip
            learned["grad_updates"] = jnp.where(random, 0.0, jnp.full((S,), float(K)))
            metrics.update(learned)
            runner = runner._replace(update=runner.update + 1)
            if evaluate is not None:
                step = runner.update[0]
                metrics["eval_return"] = jax.lax.cond(
                    (step % cfg.eval_every == 0) | (step == cfg.num_updates),
                    over_seeds(held_out_return),
                    lambda r: jnp.full((S,), jnp.nan),
                    runner,
                )
            if progress is not None:
                jax.debug.callback(progress, runner.update[0], metrics)
            return runner, metrics

        return scan_updates(one_iteration, runner, length, stop)

    return Train(init_seeds, updates, cfg.num_updates)


def work_per_update(cfg: Config) -> float:
    """An iteration's work in run.py's units (PPO's env steps x (1 + epochs)), which set its
    segment length and checkpoint interval: acting, plus each update's replay of batch_size
    episodes through the memories, forwards and backwards, at about two units a step."""
    replay = cfg.grad_updates * cfg.batch_size * (cfg.horizon + 1) * 2
    trained = (cfg.num_updates - cfg.random_iters) / cfg.num_updates
    return cfg.steps_per_update * 2 + replay * trained


USAGE = """Recurrent SAC / SAC-D with a memory module (SHM, GRU, ...) on a jitted environment.

Other modes: `python sac.py --resume DIR` continues the run in DIR from its last checkpoint;
`python sac.py --eval DIR [--episodes N] [--greedy] [--seed S]` evaluates a run;
`python sac.py --list` prints every env id and memory name.
Memories: {memories}."""


def main(argv: list[str] | None = None) -> None:
    """The CLI (run.py's `main` with this algorithm)."""
    import run

    run.main(argv, algo="sac")
