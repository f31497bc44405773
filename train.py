"""Recurrent PPO for memory agents (SHM, GRU, FFM, ...) whose whole training run compiles into
one XLA program, in the style of PureJaxRL's `ppo_rnn.py`.

    python train.py --env RepeatPreviousEasy --memory shm --num-seeds 3 --out runs/rp-easy
    python train.py --resume runs/rp-easy        # continue it after Ctrl-C
    python train.py --eval runs/rp-easy          # reload its params and report returns
    python train.py --preset paper-popgym --env RepeatPreviousHard --memory shm

Reading order: the action distributions and PPO's losses -> `make_env_and_network(cfg)` (the env,
its vector env, and the network from agents.py) -> `rollout` and `gae` -> `make_evaluate` ->
`make_train(cfg)`, which returns pure functions that `jax.jit` compiles whole: one `lax.scan`
over updates; in each update a rollout scan, GAE, and a scan over epochs x minibatches; seeds
under `lax.map` or `jax.vmap` (`seed_map`). The typed `Config` and its presets are config.py;
the networks are agents.py; the run's lifecycle (segments, checkpoints, resume, Ctrl-C, logs,
outputs, evaluation, the CLI) is run.py.

The memory's per-step randomness (SHM's random θ row indices, `aux`) is drawn while acting, stored
in the rollout and replayed in the update, which re-runs the memory from the rollout's initial
carry: the update scores exactly the policy that acted (on the first minibatch of each update the
probability ratio is 1 and the KL 0, logged as `ratio_dev_first` / `kl_first`). The authors'
RLlib update re-draws θ instead (spec/shm.md, "disagree" item 3).
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python train.py ...` hands over to run.py's CLI, which imports this file back as the
    # module `train`: the file is loaded once, as `train`, never a second time as `__main__`.
    import importlib

    import launch

    launch.start_from_command_line()  # before gymnax's import starts jax's backend
    importlib.import_module("run").main()
    raise SystemExit

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from gymnax.environments import spaces

import envs
from agents import (  # noqa: F401  (re-exported: notebooks and studies import them from here)
    ActorCritic,
    PaperAgent,
    episode_step,
    make_network,
    project_params,
    sinusoidal_table,
    time_encoding,
)
from config import FORMER_DEFAULTS, PRESETS, Config, validate  # noqa: F401  (re-exported)

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


def action_spec(env, env_params, env_id: str):
    """(continuous, action_dim, low, high) of the env's action space: Discrete(n) gives (False,
    n, None, None); Box gives (True, its size, low and high as float32 arrays). ValueError, one
    line, for any other space."""
    space = env.action_space(env_params)
    if isinstance(space, spaces.Discrete):
        return False, int(space.n), None, None
    if isinstance(space, spaces.Box):
        low, high = jnp.asarray(space.low, jnp.float32), jnp.asarray(space.high, jnp.float32)
        return True, int(np.prod(space.shape)), low, high
    raise ValueError(
        f"env {env_id!r} has action space {type(space).__name__}; supported: Discrete, Box"
    )


def make_env_and_network(cfg: Config) -> Setup:
    """Build env, vector env and network for `cfg`; ValueError on inconsistent input."""
    validate(cfg)
    env, env_params = envs.make(cfg.env)
    continuous, action_dim, low, high = action_spec(env, env_params, cfg.env)
    if cfg.head == "categorical" and continuous:
        raise ValueError(f"--head categorical needs a Discrete action space; {cfg.env!r} has Box")
    if cfg.head == "gaussian" and not continuous:
        raise ValueError(f"--head gaussian needs a Box action space; {cfg.env!r} has Discrete")

    venv = envs.VecEnv(env, env_params, cfg.num_envs, prev_action=cfg.prev_action)
    # venv.pixel_dims: leading obs components in 0..255 that the network scales to [0, 1]
    network, memory = make_network(cfg, action_dim, continuous, venv.pixel_dims)

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
    (on MineSweeperEasy a random policy would score -0.287 that way, not -0.225).

    The metrics are named as in metrics.csv: episode_return, episode_length and one per
    `env.episode_metrics` (e.g. episode_success), plus `episodes`, the number counted. Meta-RL
    envs are evaluated on their held-out tasks. `greedy` takes the most likely action (the
    Gaussian's mean) instead of sampling; `random_policy` acts uniformly at random (the baseline
    the summary compares with; `params` is then ignored).
    """
    n = num_episodes or cfg.num_envs
    env_params = setup.eval_params if setup.eval_params is not None else setup.env_params
    venv = envs.VecEnv(setup.env, env_params, n, prev_action=cfg.prev_action)
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

        return scan_updates(one_update, runner, length, stop)

    return Train(
        with_matmul_precision(cfg.matmul_precision, init_seeds),
        with_matmul_precision(cfg.matmul_precision, updates),
        cfg.num_updates,
    )


def scan_updates(one_update: Callable, runner, length: int, stop: int | None = None):
    """`length` calls of `one_update(runner) -> (runner, metrics)` in one `lax.scan`: (runner,
    metrics {name: [length, ...]}). With `stop`, updates numbered beyond `stop` (runner.update
    [S] counts those done) are skipped: the runner stays and their metrics are NaN, so one
    compiled segment also serves a run's shorter last one."""

    def body(runner, _):
        if stop is None:
            return one_update(runner)
        shapes = jax.eval_shape(one_update, runner)[1]
        nan = jax.tree.map(lambda m: jnp.full(m.shape, jnp.nan, m.dtype), shapes)
        return jax.lax.cond(runner.update[0] < stop, one_update, lambda r: (r, nan), runner)

    return jax.lax.scan(body, runner, None, length)


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
    (reset nothing / a few / all) becomes a select that computes every branch, so on a single CPU
    device one seed after another is faster (docs/performance.md)."""
    if num_seeds == 1 or (len(jax.devices()) == 1 and jax.default_backend() == "cpu"):
        return lambda f: lambda xs: jax.lax.map(f, xs)
    return jax.vmap


def main(argv: list[str] | None = None) -> None:
    """The CLI (run.py's `main`), for the `shm-train` console script and for callers that import
    this module."""
    importlib.import_module("run").main(argv)


_INSPECTION = ("one_seed", "replay_episode", "make_memory_trace", "memory_trace")


def __getattr__(name: str):
    """`train.replay_episode` and the other inspection helpers still work from here; they live
    in inspection.py, which imports this module, so they are looked up on first use."""
    if name in _INSPECTION:
        return getattr(importlib.import_module("inspection"), name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")
