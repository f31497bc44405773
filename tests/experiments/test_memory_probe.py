"""The supervised memory probe (experiments/studies/memory_probe.py): its target and its init scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.studies import memory_probe


def test_scale_params_scales_only_the_named_leaves():
    params = {
        "params": {"memory": {"theta": jnp.ones((2, 3)), "calib_proj": {"kernel": jnp.ones(2)}}}
    }
    out = memory_probe.scale_params(params, {"theta": 0.5, "calib_proj": 2.0, "value_proj": 9.0})
    np.testing.assert_array_equal(out["params"]["memory"]["theta"], 0.5)
    np.testing.assert_array_equal(out["params"]["memory"]["calib_proj"]["kernel"], 2.0)


def test_probe_learns_the_recall_with_a_gru():
    """A GRU learns to name the suit from k - 1 = 1 step back within 150 steps; the accuracy
    curve starts near chance (0.25), so the target is not trivially predictable."""
    result = memory_probe.main(
        ["--memory", "gru", "--hidden", "32", "--time-embedding", "0", "--k", "2",
         "--length", "12", "--batch", "16", "--steps", "150", "--seeds", "1", "--lr", "3e-3",
         "--json"]
    )  # fmt: skip
    assert result["final_acc"][0] > 0.9, result
    probe = memory_probe.make_probe(
        memory_probe.train.Config(memory="gru", hidden=32, time_embedding=0, lr=3e-3),
        k=2, T=12, batch=16, steps=5, scales={},
    )  # fmt: skip
    first = np.asarray(probe(jax.random.key(0)))
    assert first[0] < 0.5
