"""Wind: what a scripted controller earns on the held-out tasks, with and without memory.

    python bench/meta_oracle.py [--trials 256]

Prints the mean return per trial (one 100-step episode) on Wind-10-190's held-out tasks of:
- a memoryless controller that steps straight toward the goal (0, 1), ignoring the wind;
- a controller with one step of memory: from its last move it estimates the wind
  w = Δs − 0.1·a, then steps to the goal corrected for it;
- a uniform random policy.
The reward needs ||s − goal|| <= 0.01, so only the controller that infers the wind earns it: the
task is solvable, and it needs memory (docs/reproduction.md, "Meta-RL").
"""

import pathlib
import sys

# Run as `python bench/<name>.py`: put the repo root first on the path, not bench/.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse

import jax
import jax.numpy as jnp

import envs

GOAL = jnp.array([0.0, 1.0])
STEP = 0.1  # the env maps actions in [-1, 1] to moves in [-0.1, 0.1]


def toward_goal(pos, prev_pos, prev_action, t, key):
    return jnp.clip((GOAL - pos) / STEP, -1, 1)


def infer_wind(pos, prev_pos, prev_action, t, key):
    wind = jnp.where(t > 0, (pos - prev_pos) - STEP * jnp.clip(prev_action, -1, 1), 0.0)
    return jnp.clip((GOAL - pos - wind) / STEP, -1, 1)


def uniform(pos, prev_pos, prev_action, t, key):
    return jax.random.uniform(key, (2,), minval=-1, maxval=1)


def trial_return(env, params, policy, key):
    k_reset, key = jax.random.split(key)
    obs, state = env.reset(k_reset, params)

    def step(carry, k):
        obs, state, prev_pos, prev_action, t = carry
        k_act, k_env = jax.random.split(k)
        action = policy(obs[:2], prev_pos, prev_action, t, k_act)
        next_obs, state, reward = env.step(k_env, state, action, params)[:3]
        return (next_obs, state, obs[:2], action, t + 1), reward

    carry = (obs, state, obs[:2], jnp.zeros(2), 0)
    steps = int(params.max_steps_in_episode)
    return jax.lax.scan(step, carry, jax.random.split(key, steps))[1].sum()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=256)
    args = parser.parse_args()
    env, params = envs.make("Wind-10-190")
    held_out = env.eval_params(params)
    keys = jax.random.split(jax.random.key(0), args.trials)
    print(f"Wind-10-190, held-out tasks, {args.trials} trials of 100 steps\n")
    print("| controller | mean return | trials with any reward |")
    print("|---|---:|---:|")
    for name, policy in (
        ("toward the goal, no memory", toward_goal),
        ("infers the wind from its last move", infer_wind),
        ("uniform random", uniform),
    ):
        run = jax.jit(jax.vmap(lambda k, p=policy: trial_return(env, held_out, p, k)))
        returns = run(keys)
        print(f"| {name} | {float(returns.mean()):.3f} | {float((returns > 0).mean()):.3f} |")


if __name__ == "__main__":
    main()
