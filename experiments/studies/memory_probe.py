"""A supervised probe of how fast a memory learns RepeatPrevious's recall, without RL.

RL mixes memory learning with credit assignment and exploration, and each RL cell costs minutes.
This probe keeps only the memory question: the default agent's network (`train.ActorCritic`:
observation [+ time embedding] -> Dense -> memory -> Dense -> logits) sees a sequence of random
suits (one-hot, 4) and must name, at every step t >= k - 1, the suit shown k - 1 steps before,
exactly RepeatPreviousEasy's target (k = 4, 51 steps per episode). It is trained by cross-entropy
with Adam, fresh sequences every step, and SHM's θ rows drawn at random per step as in training.

    python -m experiments.studies.memory_probe --memory shm --steps 1500
    python -m experiments.studies.memory_probe --memory shm --time-embedding 0 --theta-scale 0.1

It prints the accuracy curve and the number of steps to reach 90% accuracy, and with `--json` one
JSON line (docs/findings/memory-probe.md collects those).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import train


def scale_params(params, scales: dict[str, float]):
    """Multiply the parameter leaves whose path contains a given name (e.g. "theta") by a
    factor: the probe's way of varying SHM's initialisation without changing the layer."""

    def scale(path, x):
        names = [getattr(p, "key", "") for p in path]
        factor = 1.0
        for name, s in scales.items():
            if name in names:
                factor *= s
        return x * factor

    return jax.tree_util.tree_map_with_path(scale, params)


def make_probe(
    cfg: train.Config, k: int, T: int, batch: int, steps: int, scales: dict, memory_lr_scale=1.0
):
    """A jitted `probe(key) -> accuracy [steps]` for the network `cfg` builds."""
    setup = train.make_env_and_network(dataclasses.replace(cfg, prev_action=False))
    network, memory = setup.network, setup.memory
    obs_dim = setup.venv.obs_dim
    tx = optax.multi_transform(
        {
            "memory": optax.adam(cfg.lr * memory_lr_scale, eps=1e-5),
            "rest": optax.adam(cfg.lr, eps=1e-5),
        },
        lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: (
                "memory" if "memory" in [getattr(p, "key", "") for p in path] else "rest"
            ),
            params,
        ),
    )

    def batch_of(key):
        suits = jax.random.randint(key, (T, batch), 0, 4)
        obs = jax.nn.one_hot(suits, obs_dim)  # [T, B, obs_dim] (the first 4 components)
        target = jnp.roll(suits, k - 1, axis=0)  # target[t] = suits[t - k + 1]
        valid = (jnp.arange(T) >= k - 1)[:, None] * jnp.ones((1, batch))
        return obs, target, valid

    resets = jnp.zeros((T, batch), bool).at[0].set(True)

    def loss_fn(params, key):
        key_data, key_aux = jax.random.split(key)
        obs, target, valid = batch_of(key_data)
        aux = memory.sample_aux(key_aux, (T, batch))
        carry = network.initialize_carry((batch,))
        _, logits, _ = network.apply(params, carry, obs, resets, aux)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], -1)[..., 0]
        acc = (logits.argmax(-1) == target).astype(jnp.float32)
        return (nll * valid).sum() / valid.sum(), (acc * valid).sum() / valid.sum()

    def probe(key):
        key_init, key = jax.random.split(key)
        obs, _, _ = batch_of(key_init)
        aux = memory.sample_aux(key_init, (T, batch))
        params = network.init(key_init, network.initialize_carry((batch,)), obs, resets, aux)
        params = scale_params(params, scales)
        opt_state = tx.init(params)

        def step(state, key):
            params, opt_state = state
            (_, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), acc

        _, acc = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
        return acc

    return jax.jit(probe)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="shm")
    parser.add_argument("--memory-size", type=int, default=32)
    parser.add_argument("--memory-features", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--time-embedding", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--theta-scale", type=float, default=1.0, help="multiply Θ's init")
    parser.add_argument("--calib-scale", type=float, default=1.0, help="multiply W_c's init")
    parser.add_argument("--value-scale", type=float, default=1.0, help="multiply W_v's init")
    parser.add_argument("--memory-lr-scale", type=float, default=1.0)
    parser.add_argument("--theta-init", default="xavier")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--length", type=int, default=51)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--label", default="")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    cfg = dataclasses.replace(
        train.Config(),
        env="RepeatPreviousEasy",
        memory=args.memory,
        memory_size=args.memory_size,
        memory_features=args.memory_features,
        hidden=args.hidden,
        time_embedding=args.time_embedding,
        lr=args.lr,
        theta_init=args.theta_init,
    )
    scales = {
        "theta": args.theta_scale,
        "calib_proj": args.calib_scale,
        "value_proj": args.value_scale,
    }
    probe = make_probe(
        cfg, args.k, args.length, args.batch, args.steps, scales, args.memory_lr_scale
    )
    t0 = time.perf_counter()
    acc = np.stack([np.asarray(probe(jax.random.key(s))) for s in range(args.seeds)])  # [S, steps]
    wall = time.perf_counter() - t0
    window = max(1, args.steps // 20)
    smooth = np.stack([np.convolve(a, np.ones(window) / window, mode="valid") for a in acc])
    reach = [int(np.argmax(s >= 0.9)) + window if (s >= 0.9).any() else None for s in smooth]
    final = acc[:, -window:].mean(axis=1)
    result = dict(
        label=args.label or args.memory,
        args=vars(args),
        final_acc=final.tolist(),
        steps_to_90=reach,
        wall_s=round(wall, 1),
    )
    if args.json:
        print(json.dumps(result))
    else:
        for i in range(0, args.steps, max(1, args.steps // 10)):
            print(f"step {i:5d}  accuracy {acc[:, i : i + window].mean():.3f}")
        print(
            f"{result['label']}: final accuracy {final.mean():.3f} ± {final.std():.3f}, "
            f"steps to 90%: {reach} ({wall:.0f} s)"
        )
    return result


if __name__ == "__main__":
    main()
