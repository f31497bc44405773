"""Visual Match / Key-to-Door: oracle returns and vmapped step throughput.

    python bench/credit_assign.py [--episodes 256] [--num-envs 1024]

Prints two markdown tables: the return of the scripted oracle (`env.oracle_action`: greedy apple
collection, right door / key) and of a uniform random policy per registered id, and the
throughput of `jit(scan(vmap(step_env)))` over one episode with random actions.
"""

import pathlib
import sys

# Run as `python bench/<name>.py`: put the repo root first on the path, not bench/ (whose envs.py
# and train.py would shadow the `envs` package and `train.py`).
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])


import argparse
import os
import time

import jax
import numpy as np

import envs


def rollout(env, params, keys, oracle: bool):
    """Returns per episode: (apple reward, final-phase reward, success) over a whole episode."""

    def one(key):
        k_reset, k_act = jax.random.split(key)
        obs, state = env.reset_env(k_reset, params)

        def body(state, k):
            random_action = jax.random.randint(k, (), 0, 4)
            action = env.oracle_action(state, params) if oracle else random_action
            phase, _ = env.phase_and_frame(state.time)
            _, state, reward, _, info = env.step_env(k, state, action, params)
            return state, (reward * (phase == 1), reward * (phase == 2), info["success"])

        keys = jax.random.split(k_act, env.episode_len)
        _, (apples, final, success) = jax.lax.scan(body, state, keys)
        return apples.sum(), final.sum(), success[-1]

    return jax.jit(jax.vmap(one))(keys)


def throughput(env, params, num_envs: int) -> float:
    """Env steps per second of jit(scan(vmap(step_env))) over one episode, random actions."""

    @jax.jit
    def run(key):
        keys = jax.random.split(key, num_envs)
        _, state = jax.vmap(env.reset_env, in_axes=(0, None))(keys, params)

        def body(state, k):
            actions = jax.random.randint(k, (num_envs,), 0, 4)
            obs, state, reward, done, _ = jax.vmap(env.step_env, in_axes=(None, 0, 0, None))(
                k, state, actions, params
            )
            return state, obs.sum() + reward.sum()

        _, out = jax.lax.scan(body, state, jax.random.split(key, env.episode_len))
        return out.sum()

    run(jax.random.key(0)).block_until_ready()  # compile
    start = time.perf_counter()
    run(jax.random.key(1)).block_until_ready()
    return num_envs * env.episode_len / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--num-envs", type=int, default=1024)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs\n")
    print(f"Returns over {args.episodes} episodes (mean ± std)\n")
    print(
        "| env | length | oracle apples | oracle return | oracle success | random return | random success |"
    )
    print("|---|---|---|---|---|---|---|")
    keys = jax.random.split(jax.random.key(0), args.episodes)
    for game in ("VisualMatch", "KeyToDoor"):
        for d in (100, 250, 500):
            env, params = envs.make(f"{game}-{d}")
            apples, final, success = map(np.asarray, rollout(env, params, keys, oracle=True))
            r_apples, r_final, r_success = map(np.asarray, rollout(env, params, keys, oracle=False))
            ret, r_ret = apples + final, r_apples + r_final
            print(
                f"| {env.name} | {env.episode_len} | {apples.mean():.1f} ± {apples.std():.1f} "
                f"| {ret.mean():.1f} ± {ret.std():.1f} | {success.mean():.2f} "
                f"| {r_ret.mean():.1f} ± {r_ret.std():.1f} | {r_success.mean():.2f} |"
            )
    print(f"\nThroughput, {args.num_envs} envs, one episode of random actions\n")
    print("| env | M steps/s |")
    print("|---|---|")
    for name in ("VisualMatch-250", "KeyToDoor-250"):
        env, params = envs.make(name)
        print(f"| {name} | {throughput(env, params, args.num_envs) / 1e6:.2f} |")


if __name__ == "__main__":
    main()
