"""The PPO run's typed configuration: `Config` (every knob, with its CLI flag's doc), the presets
(`PRESETS`, picked with `--preset NAME`) and `validate`, the checks of user input that do not need
the env or the network (those are in `train.make_env_and_network` and `agents.make_network`).

    from config import Config, PRESETS
    cfg = dataclasses.replace(PRESETS["paper-popgym"], env="AutoencodeEasy")
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import shm_jax
from agents import check_paper_knobs


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
    theta_init: Literal["xavier", "xavier_abs"] = "xavier_abs"
    """SHM (either agent): initialisation of the calibration bank Θ (`shm_jax.SHM.theta_init`).
    xavier_abs (default) = |Xavier-uniform|: every row starts with the same signs, so whether
    C_t forgets is set by the learned c_t, not by which random row was drawn; xavier = the
    paper's Xavier-uniform (`--preset paper-popgym`). Memories without Θ ignore it."""
    calib_init: Literal["lecun", "zeros"] = "zeros"
    """SHM with θ calibration (shm, shm_single): initialisation of W_c in c_t = W_c x̂_t
    (`shm_jax.SHM.calib_init`). zeros (default) = c_t = 0, so C_t = 1 at the start and W_c
    learns from the first update: with xavier_abs Θ this is the bounded start, whose C_t cannot
    overflow the memory on long episodes; lecun = flax's default, the paper's
    (`--preset paper-popgym`). Memories without W_c ignore it. A config.json without this key ran
    with lecun (`FORMER_DEFAULTS`)."""
    memory_method: Literal[
        "auto", "sequential", "associative", "chunked", "pallas", "pallas_pipelined", "native"
    ] = "auto"
    """SHM: how the layer computes the recurrence (`shm_jax.SHM.method`); the numbers are the
    same, only speed and memory differ. auto = the fastest measured form (docs/performance.md):
    native on a CPU (sequential if the C++ kernel cannot be built), pallas on a GPU; native = the
    C++ CPU kernel (`shm_jax.native`, built on first use); sequential = `lax.scan` with a
    hand-written backward; pallas = the fused GPU kernel (`shm_jax.kernel.pallas_read`;
    interpreted, very slowly, on a CPU); pallas_pipelined = the same kernel loading whole chunks
    one chunk ahead (opt-in until timed on a GPU)."""
    memory_unroll: int = 0
    """GRU: time steps per iteration of its compiled scan (speed only). 0 = by backend: 16 on a
    GPU, 1 on a CPU, the faster of the two on each (docs/performance.md)."""
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
    write was (docs/findings/why-shm-learned-slowly.md). The paper agent has its own, 128 wide."""
    paper_time_embedding: Literal["blend", "append", "off"] = "blend"
    """Paper agent, SHM: how the step index reaches the memory. blend = the authors'
    x <- (1 - s)·x + s·pe[t] over the 128 features (s learned, from 0.5); append = our default
    agent's way, a 16-wide encoding appended to the features; off = none. An ablation knob
    (docs/findings/paper-agent-ablation.md)."""
    paper_append_width: int = 16
    """Paper agent, --paper-time-embedding append: the appended encoding's width (16, our
    default agent's; 128 = the authors' blend code, appended instead of added). An ablation knob
    (docs/findings/time-code-width.md)."""
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
    [0, 1] (the authors' 0.5). An ablation knob (docs/findings/paper-agent-ablation.md)."""
    paper_input_norm: bool = True
    """Paper agent: the LayerNorm (no scale or shift) after the 128-wide feature map, as the
    authors have it. An ablation knob (docs/findings/paper-agent-ablation.md)."""
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
    turns it off. On by default: with it the short default run solves RepeatFirstEasy."""
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
# Fields whose default changed: the value a config.json written without the key ran with.
FORMER_DEFAULTS = {"calib_init": "lecun"}

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
        theta_init="xavier",  # the paper's init (shared/spec/shm.md)
        calib_init="lecun",
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
    for name in ("max_grad_norm", "vf_loss_clip", "kl_coeff"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = off)")
    for name in ("memory_features", "paper_readout"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = the memory size)")
    if cfg.kl_target <= 0:
        raise ValueError(f"--kl-target must be > 0, got {cfg.kl_target}")
    check_paper_knobs(cfg)
