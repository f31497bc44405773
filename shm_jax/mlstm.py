"""The mLSTM of xLSTM (Beck et al., 2024, Sec. 2.3), with its stabiliser, time-major.

One step per head (head width d), input x_t:

    q_t = W_q x_t;  k_t = W_k x_t / √d;  v_t = W_v x_t;  o_t = σ(W_o x_t + b_o)
    ĩ_t = w_i · x_t + b_i;  f̃_t = w_f · x_t + b_f                     scalar gates per head
    m_t = max(log σ(f̃_t) + m_{t-1}, ĩ_t)                              the stabiliser
    i'_t = exp(ĩ_t − m_t);  f'_t = exp(log σ(f̃_t) + m_{t-1} − m_t)
    C_t = f'_t C_{t-1} + i'_t v_t k_tᵀ;  n_t = f'_t n_{t-1} + i'_t k_t
    h_t = o_t ⊙ C_t q_t / max(|n_tᵀ q_t|, exp(−m_t))

The heads' h_t are concatenated and projected to the output width. The stabiliser is a max
recurrence, so the whole sequence runs as one sequential `lax.scan`.

The carry's start (and its value after a reset) is C = n = 0 and m = `M_START` = -1e30, a
finite stand-in for -inf: log σ(f̃_1) + (-1e30) rounds to -1e30 in float32 and float64, so
m_1 = max(-1e30, ĩ_1) = ĩ_1 exactly, f'_1 = exp(-1e30 − ĩ_1) = 0, and the max sends no
gradient to the forget branch; no inf − inf or 0 · inf appears in values or gradients.
exp(−m) is formed only from m_t after the max (m_t ≥ ĩ_t), never from the start value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from shm_jax.baselines import _NoAux, check_carry, check_sequence

M_START = -1e30  # the stabiliser's start, a finite -inf (module docstring)


class MLSTMCarry(NamedTuple):
    """The mLSTM state per env and head: C [*batch, heads, d, d], n [*batch, heads, d],
    m [*batch, heads]."""

    C: jax.Array
    n: jax.Array
    m: jax.Array


def mlstm_step(carry: MLSTMCarry, inputs) -> tuple[MLSTMCarry, jax.Array]:
    """One mLSTM step (module docstring: xLSTM Sec. 2.3, stabilised).

    inputs = (q, k, v [*batch, heads, d], i_pre, f_pre [*batch, heads], reset [*batch] bool),
    with k already scaled by 1/√d. A reset restores the start (C = n = 0, m = M_START) before
    the step. Returns (carry, C_t q_t / max(|n_tᵀ q_t|, exp(−m_t)) [*batch, heads, d])."""
    q, k, v, i_pre, f_pre, reset = inputs
    r = reset[..., None]  # [*batch, 1]: one flag for every head
    C = jnp.where(r[..., None, None], 0.0, carry.C)
    n = jnp.where(r[..., None], 0.0, carry.n)
    m_prev = jnp.where(r, jnp.asarray(M_START, carry.m.dtype), carry.m)
    log_f = jax.nn.log_sigmoid(f_pre)
    m = jnp.maximum(log_f + m_prev, i_pre)
    i_gate = jnp.exp(i_pre - m)
    f_gate = jnp.exp(log_f + m_prev - m)
    C = f_gate[..., None, None] * C + i_gate[..., None, None] * v[..., :, None] * k[..., None, :]
    n = f_gate[..., None] * n + i_gate[..., None] * k
    numerator = jnp.einsum("...ij,...j->...i", C, q)
    denominator = jnp.maximum(jnp.abs(jnp.sum(n * q, axis=-1)), jnp.exp(-m))
    return MLSTMCarry(C, n, m), numerator / denominator[..., None]


def mlstm_scan(q, k, v, i_pre, f_pre, resets, carry: MLSTMCarry):
    """`mlstm_step` over time: q, k, v [T, *batch, heads, d]; i_pre, f_pre [T, *batch, heads];
    resets [T, *batch]. Returns (carry after the last step, h̃ [T, *batch, heads, d]) (h̃ before
    the output gate)."""
    return jax.lax.scan(mlstm_step, carry, (q, k, v, i_pre, f_pre, resets))


class MLSTM(_NoAux, nn.Module):
    """The mLSTM memory: `__call__(carry, x, resets, aux) -> (carry, y)`, time-major.

    Attributes:
      size: the hidden width, heads · d (q, k, v, o and h are `size` wide).
      features: output width (defaults to `size`).
      num_heads: heads, each with its own d × d matrix C (d = size / num_heads). Default 1: one
        `size` × `size` matrix memory, the same state size as SHM's at the same `size` (SHM's
        H × H). The state per env is heads · (d² + d + 1) = size² / heads + size + heads floats.
      dtype: parameter and computation dtype.

    q, k, v have no bias; the gates and the output projection do. The forget-gate biases start
    evenly spaced in [3, 6] over the heads (σ ≈ 0.95-0.998, long memory at the start), the
    input-gate biases at 0.
    """

    size: int
    features: int | None = None
    num_heads: int = 1
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.size < 1 or self.num_heads < 1 or self.size % self.num_heads:
            raise ValueError(
                f"MLSTM: size must be a positive multiple of num_heads; got size={self.size}, "
                f"num_heads={self.num_heads}"
            )
        super().__post_init__()

    def initialize_carry(self, batch_shape: tuple[int, ...]) -> MLSTMCarry:
        """The start: C = 0 [*batch, heads, d, d], n = 0 [*batch, heads, d], m = M_START
        [*batch, heads]."""
        h, d = self.num_heads, self.size // self.num_heads
        return MLSTMCarry(
            C=jnp.zeros((*batch_shape, h, d, d), self.dtype),
            n=jnp.zeros((*batch_shape, h, d), self.dtype),
            m=jnp.full((*batch_shape, h), M_START, self.dtype),
        )

    @nn.compact
    def __call__(self, carry, x, resets=None, aux=None):
        """carry `MLSTMCarry`; x [T, B, d_in]; resets [T, B] bool (None: no episode starts).

        Returns (carry after the last step, y [T, B, features])."""
        del aux
        resets = check_sequence("MLSTM", x, resets)
        check_carry("MLSTM", carry, self.initialize_carry(x.shape[1:-1]))
        h, d = self.num_heads, self.size // self.num_heads
        dense = lambda n, name, bias=False, **kw: nn.Dense(
            n, use_bias=bias, dtype=self.dtype, param_dtype=self.dtype, name=name, **kw
        )
        heads = lambda a: a.reshape(*a.shape[:-1], h, d)  # [T, B, size] -> [T, B, heads, d]
        q = heads(dense(self.size, "query")(x))
        k = heads(dense(self.size, "key")(x)) / jnp.sqrt(jnp.asarray(d, self.dtype))
        v = heads(dense(self.size, "value")(x))
        forget_bias = lambda key, s, dtype: jnp.linspace(3.0, 6.0, s[0], dtype=dtype)
        i_pre = dense(h, "input_gate", bias=True)(x)  # [T, B, heads]
        f_pre = dense(h, "forget_gate", bias=True, bias_init=forget_bias)(x)
        o = nn.sigmoid(dense(self.size, "output_gate", bias=True)(x))  # [T, B, size]
        carry = jax.tree.map(lambda a: a.astype(self.dtype), MLSTMCarry(*carry))
        carry, h_tilde = mlstm_scan(q, k, v, i_pre, f_pre, resets, carry)
        h_out = o * h_tilde.reshape(*h_tilde.shape[:-2], self.size)  # [T, B, size]
        y = dense(self.features or self.size, "out", bias=True)(h_out)
        chex.assert_shape(y, (*x.shape[:-1], self.features or self.size))
        return carry, y
