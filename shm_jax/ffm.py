"""Fast and Forgetful Memory (Morad, Kortvelesy, Liwicki and Prorok, NeurIPS 2023), time-major.

One step, input x_t (width d), state S_{t-1} (m × c complex):

    x̃_t = (W_p x_t + b_p) ⊙ σ(W_i x_t + b_i)                     input, size m
    γ_jk = exp(α_j + i ω_k)                                       decay and rotation, m × c
    S_t = γ ⊙ S_{t-1} + x̃_t 1_cᵀ                                  the aggregator
    g_t = σ(W_g x_t + b_g)
    y_t = LN(W_mix [Re S_t; Im S_t] + b_mix) ⊙ g_t + (W_skip x_t + b_skip) ⊙ (1 − g_t)

The aggregator is diagonal and affine in S, so every S_t comes from one associative scan over the
pairs (γ, x̃_t 1_cᵀ) (the paper's scan over (S, Δt) pairs, with Δt = 1 per step). A state carried
in from the previous call is decayed by γ¹ at the call's first step, like every other step: a
call of one step gives the same numbers as a step inside a long call.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from shm_jax.baselines import _NoAux, check_carry, check_sequence
from shm_jax.scan import affine_scan, fold_memory

ALPHA_MAX = -1e-8  # |γ| < 1: every trace fades (the paper's α ∈ ℝ₋)


def ffm_decay(alpha: jax.Array, omega: jax.Array) -> jax.Array:
    """γ [m, c] = exp(α_j + i ω_k) from α [m] and ω [c], with α clipped to
    [log(smallest normal float), -1e-8]. The upper bound makes every trace fade. The lower bound
    only keeps γ itself a normal number: the scan forms γ^k by repeated products, which round to
    0 (never to inf or NaN) once they underflow, so no bound tied to the sequence length is
    needed (a closed form that divides by γ^t would need one)."""
    lo = math.log(jnp.finfo(alpha.dtype).tiny)
    alpha = jnp.clip(alpha, lo, ALPHA_MAX)
    return jnp.exp(alpha[:, None] + 1j * omega[None, :])


def ffm_states(gamma: jax.Array, x_tilde: jax.Array, resets: jax.Array, state: jax.Array):
    """Every S_t [T, *batch, m, c] of S_t = γ ⊙ S_{t-1} + x̃_t 1_cᵀ.

    gamma [m, c] complex; x_tilde [T, *batch, m]; resets [T, *batch] bool (S_{t-1} is zeroed
    before step t); state [*batch, m, c] complex, the S carried in. One associative scan
    (`shm_jax.scan`'s Hadamard recurrence: resets are selects, so an inf state never leaks
    across an episode start)."""
    a = jnp.broadcast_to(gamma, (*x_tilde.shape, gamma.shape[-1]))
    b = jnp.broadcast_to(x_tilde[..., None], a.shape).astype(a.dtype)
    b = fold_memory(a, b, resets, state)  # b_0 += γ ⊙ S_carried: the first step decays it, too
    return affine_scan(a, b, resets)


def ffm_features(S: jax.Array) -> jax.Array:
    """[Re S; Im S] flattened: S [..., m, c] complex -> [..., 2 m c] real (Re first, row-major)."""
    flat = S.reshape(*S.shape[:-2], -1)
    return jnp.concatenate([flat.real, flat.imag], axis=-1)


class FFM(_NoAux, nn.Module):
    """Fast and Forgetful Memory: `__call__(carry, x, resets, aux) -> (carry, y)`, time-major.

    Attributes:
      size: m, the width of the input x̃_t (the paper's m = 128 for POPGym).
      features: output width (defaults to `size`).
      context: c, the number of rotation frequencies ω_k (the paper's 4). The state S is m × c
        complex: 2 m c floats per env.
      min_period, max_period: ω_k starts at 2π / linspace(min_period, max_period, c) (the
        paper's 1 and 1024), a learned parameter.
      alpha_init: "even" or "horizons", how α starts (below).
      forgotten_at: with alpha_init="horizons", what is left of a trace at its horizon, in (0, 1).
      dtype: parameter and computation dtype (the state is the matching complex dtype).

    α_j (learned) starts per `alpha_init`: "even" (default) spaces it evenly in [-0.5, -1e-6],
    from traces that halve in about a step to traces that last ~10⁶ steps; "horizons" starts it
    at ln(forgotten_at) / t_j with t_j = linspace(1, max_period, m), so that trace j has decayed to
    `forgotten_at` after t_j steps (at m = 32 only one trace then forgets within 30 steps: it
    learned RepeatPreviousEasy far more slowly, docs/reproduction.md). `ffm_decay` keeps
    α ≤ -1e-8. The projections W_p, W_i,
    W_g, W_mix and W_skip are affine (flax Dense with bias); the LayerNorm has no learned scale
    or shift (the paper's).
    """

    size: int
    features: int | None = None
    context: int = 4
    min_period: float = 1.0
    max_period: float = 1024.0
    alpha_init: str = "even"
    forgotten_at: float = 0.01
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.size < 1 or self.context < 1:
            raise ValueError(f"FFM: size and context must be >= 1; got {self.size}, {self.context}")
        if not 0 < self.min_period <= self.max_period:
            raise ValueError(
                f"FFM: periods need 0 < min_period <= max_period; got {self.min_period}, "
                f"{self.max_period}"
            )
        if self.alpha_init not in ("even", "horizons"):
            raise ValueError(
                f"FFM: alpha_init must be 'even' or 'horizons'; got {self.alpha_init!r}"
            )
        if not 0 < self.forgotten_at < 1:
            raise ValueError(f"FFM: forgotten_at must be in (0, 1); got {self.forgotten_at}")
        super().__post_init__()

    @property
    def complex_dtype(self):
        return jnp.promote_types(self.dtype, jnp.complex64)

    def initialize_carry(self, batch_shape: tuple[int, ...]) -> jax.Array:
        """Zero state S: [*batch_shape, m, c] complex."""
        return jnp.zeros((*batch_shape, self.size, self.context), self.complex_dtype)

    @nn.compact
    def __call__(self, carry, x, resets=None, aux=None):
        """carry S [B, m, c] complex; x [T, B, d]; resets [T, B] bool (None: no episode starts).

        Returns (S after the last step [B, m, c], y [T, B, features])."""
        del aux
        resets = check_sequence("FFM", x, resets)
        check_carry("FFM", carry, self.initialize_carry(x.shape[1:-1]))
        m, c, out = self.size, self.context, self.features or self.size
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.dtype, name=name)
        horizons = lambda n, dtype: jnp.linspace(1.0, self.max_period, n, dtype=dtype)
        if self.alpha_init == "even":
            alpha_init = lambda key, shape, dtype: -jnp.linspace(1e-6, 0.5, shape[0], dtype=dtype)
        else:
            alpha_init = lambda key, shape, dtype: (
                math.log(self.forgotten_at) / horizons(*shape, dtype)
            )
        periods = lambda n, dtype: jnp.linspace(self.min_period, self.max_period, n, dtype=dtype)
        omega_init = lambda key, shape, dtype: 2 * jnp.pi / periods(shape[0], dtype)
        alpha = self.param("alpha", alpha_init, (m,), self.dtype)
        omega = self.param("omega", omega_init, (c,), self.dtype)
        x_tilde = dense(m, "proj")(x) * nn.sigmoid(dense(m, "in_gate")(x))  # [T, B, m]
        S = ffm_states(ffm_decay(alpha, omega), x_tilde, resets, carry.astype(self.complex_dtype))
        z = dense(out, "mix")(ffm_features(S))  # [T, B, features]
        z = nn.LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype, name="norm")(z)
        g = nn.sigmoid(dense(out, "gate")(x))
        y = z * g + dense(out, "skip")(x) * (1 - g)
        chex.assert_shape(y, (*x.shape[:-1], out))
        return S[-1], y
