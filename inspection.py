"""Looking inside a trained policy (notebooks, experiments/studies/): replay its episodes
(`replay_episode`) and trace the SHM layer's memory M_t, C_t, U_t along them (`memory_trace`,
`make_memory_trace`). One seed's params from a run: `one_seed(run.load_run(DIR)[1], i)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import envs
import shm_jax
from config import Config
from train import Setup, act, env_action, metric_name


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
    replay = _replayer(cfg, setup, num_episodes, held_out, greedy)
    record = jax.device_get(replay(params, key))
    ends = np.flatnonzero(record["done"])[:num_episodes]
    T = int(ends[-1]) + 1 if len(ends) == num_episodes else len(record["done"])
    out = jax.tree.map(lambda x: np.asarray(x[:T]), record)
    out["episode"] = np.cumsum(out["reset"]) - 1
    info = out.pop("info")
    ends = ends[ends < T]
    out.update({metric_name(k): v[ends] for k, v in info.items()})
    return out


_REPLAYERS: dict = {}


def _replayer(cfg: Config, setup: Setup, num_episodes: int, held_out: bool, greedy: bool):
    """replay_episode's jitted program, compiled once per (setup, episodes, held_out, greedy):
    notebooks and studies replay many params through one network."""
    cache_key = (id(setup), cfg, num_episodes, held_out, greedy)
    if cache_key in _REPLAYERS:
        return _REPLAYERS[cache_key][1]
    env_params = setup.eval_params if held_out else setup.env_params
    venv = envs.VecEnv(setup.env, env_params, 1, prev_action=cfg.prev_action)

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

    _REPLAYERS[cache_key] = (setup, jax.jit(replay))  # setup kept: its id stays unique
    return _REPLAYERS[cache_key][1]


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
