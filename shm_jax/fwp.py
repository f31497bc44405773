"""A fast weight programmer with the delta rule (Schlag, Irie and Schmidhuber, ICML 2021, Sec. 4),
time-major.

One step, input x_t, fast weights M_{t-1} (H × H):

    k_t = relu(W_k x_t) / (1e-5 + Σ relu(W_k x_t));  q_t likewise with W_q   (SHM's keys)
    v_t = W_v x_t;  β_t = σ(w_β · x_t)
    M_t = M_{t-1} + β_t (v_t − M_{t-1} k_t) k_tᵀ                               the delta rule
    y_t = M_t q_t;  out_t = W_o y_t + b_o

The delta rule reads M_{t-1} before writing, so the recurrence is not a diagonal one: the whole
sequence runs as one sequential `lax.scan`. Keys and queries are sum-normalised as in SHM (the
paper's DPFP feature map is another choice; SHM's keeps the two memories comparable).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from shm_jax.baselines import _NoAux, check_carry, check_sequence


def sum_normalise(a: jax.Array) -> jax.Array:
    """relu(a) / (1e-5 + Σ relu(a)) over the last axis (SHM's key and query map)."""
    a = nn.relu(a)
    return a / (1e-5 + a.sum(-1, keepdims=True))


def delta_rule_step(M, inputs):
    """M_t = M̃_{t-1} + β_t (v_t − M̃_{t-1} k_t) k_tᵀ and y_t = M_t q_t, where M̃_{t-1} is M_{t-1}
    or 0 if step t starts an episode. inputs = (k, q, v [*batch, H], beta [*batch],
    reset [*batch] bool); M [*batch, H, H]. Returns (M_t, y_t [*batch, H])."""
    k, q, v, beta, reset = inputs
    M = jnp.where(reset[..., None, None], 0.0, M)
    error = v - jnp.einsum("...ij,...j->...i", M, k)
    M = M + (beta[..., None] * error)[..., :, None] * k[..., None, :]
    return M, jnp.einsum("...ij,...j->...i", M, q)


def delta_rule_scan(k, q, v, beta, resets, M):
    """`delta_rule_step` over time: k, q, v [T, *batch, H]; beta [T, *batch]; resets [T, *batch];
    M [*batch, H, H] carried in. Returns (M after the last step, y [T, *batch, H])."""
    return jax.lax.scan(delta_rule_step, M, (k, q, v, beta, resets))


class FWP(_NoAux, nn.Module):
    """Fast weight programmer (delta rule): `__call__(carry, x, resets, aux) -> (carry, y)`.

    Attributes:
      size: H, the fast weights M are H × H (H² floats per env, SHM's state size at equal H).
      features: output width (defaults to `size`).
      dtype: parameter and computation dtype.

    W_k, W_q, W_v and w_β have no bias (as SHM's projections); W_o has one.
    """

    size: int
    features: int | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"FWP: size must be >= 1; got {self.size}")
        super().__post_init__()

    def initialize_carry(self, batch_shape: tuple[int, ...]) -> jax.Array:
        """Zero fast weights M: [*batch_shape, H, H]."""
        return jnp.zeros((*batch_shape, self.size, self.size), self.dtype)

    @nn.compact
    def __call__(self, carry, x, resets=None, aux=None):
        """carry M [B, H, H]; x [T, B, d]; resets [T, B] bool (None: no episode starts).

        Returns (M after the last step [B, H, H], y [T, B, features])."""
        del aux
        resets = check_sequence("FWP", x, resets)
        check_carry("FWP", carry, self.initialize_carry(x.shape[1:-1]))
        H = self.size
        dense = lambda n, name, bias=False: nn.Dense(
            n, use_bias=bias, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        k = sum_normalise(dense(H, "key")(x))  # [T, B, H]
        q = sum_normalise(dense(H, "query")(x))
        v = dense(H, "value")(x)
        beta = nn.sigmoid(dense(1, "beta")(x))[..., 0]  # [T, B]
        M, read = delta_rule_scan(k, q, v, beta, resets, carry.astype(self.dtype))
        y = dense(self.features or H, "out", bias=True)(read)
        chex.assert_shape(y, (*x.shape[:-1], self.features or H))
        return M, y
