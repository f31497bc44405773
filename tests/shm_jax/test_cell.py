"""`SHMCell`, one step at a time under flax's `nn.RNN` and inside `nn.scan` (PureJaxRL's
`ScannedRNN`), against the `SHM` layer's sequence form on one params tree."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shm_jax import SHM, SHMCell

T, B, D, H = 7, 3, 5, 4


@pytest.fixture(scope="module")
def setup():
    kx, kp, ka, km, kr = jax.random.split(jax.random.key(0), 5)
    layer = SHM(H, theta_init="xavier_abs", method="sequential")
    x = jax.random.normal(kx, (T, B, D))
    aux = layer.sample_aux(ka, (T, B))
    resets = jax.random.bernoulli(kr, 0.3, (T, B)).at[4, 0].set(True)
    M0 = 0.5 * jax.random.normal(km, (B, H, H))
    # W_c starts random (lecun), so C_t differs from 1 and a wrong θ row would show
    params = layer.init(kp, M0, x, resets, aux)
    return layer, params, x, aux, resets, M0


class Scanned(nn.Module):
    """PureJaxRL's ScannedRNN pattern: nn.scan over time with per-step (x, aux, reset)."""

    @nn.compact
    def __call__(self, carry, inputs):
        scan = nn.scan(
            lambda cell, c, xs: cell(c, xs),
            variable_broadcast="params",
            split_rngs={"params": False},
        )
        return scan(SHMCell(H, theta_init="xavier_abs", name="cell"), carry, inputs)


def test_scanned_cell_equals_the_layer_with_resets(setup):
    layer, params, x, aux, resets, M0 = setup
    M_ref, y_ref = layer.apply(params, M0, x, resets, aux)
    M, y = Scanned().apply({"params": {"cell": params["params"]}}, M0, (x, aux, resets))
    chex.assert_trees_all_close((M, y), (M_ref, y_ref), rtol=1e-5, atol=1e-5)


def test_rnn_of_cell_equals_the_layer_on_the_rows_it_drew(setup):
    layer, params, x, _, _, M0 = setup
    rnn = nn.RNN(
        SHMCell(H, theta_init="xavier_abs"),
        time_major=True,
        return_carry=True,
        split_rngs={"params": False, "aux": True},
        variable_axes={"intermediates": 0},
    )
    variables = {"params": {"cell": params["params"]}}
    (M, y), state = rnn.apply(
        variables, x, initial_carry=M0, rngs={"aux": jax.random.key(3)}, mutable="intermediates"
    )
    aux = state["intermediates"]["cell"]["aux"][0]  # [T, B]
    assert aux.shape == (T, B) and len(np.unique(aux)) > 3  # a fresh row per step
    M_ref, y_ref = layer.apply(params, M0, x, None, aux)
    chex.assert_trees_all_close((M, y), (M_ref, y_ref), rtol=1e-5, atol=1e-5)


def test_cell_ignores_what_came_before_a_reset(setup):
    _, params, x, aux, _, M0 = setup
    cell = SHMCell(H)
    resets = jnp.zeros((T, B), bool).at[3].set(True)
    x2 = x.at[:3].add(1.0)
    M, M2 = M0, 2 * M0
    for t in range(T):
        M, y = cell.apply(params, M, (x[t], aux[t], resets[t]))
        M2, y2 = cell.apply(params, M2, (x2[t], aux[t], resets[t]))
        if t >= 3:
            np.testing.assert_allclose(y, y2, rtol=1e-6)
        else:
            assert not np.allclose(y, y2)


def test_initialize_carry_and_bad_shapes():
    cell = SHMCell(H)
    M = cell.initialize_carry(jax.random.key(0), (B, D))
    assert M.shape == (B, H, H) and not M.any()
    with pytest.raises(ValueError, match="one step"):
        cell.init(jax.random.key(0), M, (jnp.zeros((T, B, D)), jnp.zeros((T, B), jnp.int32)))
