"""Baseline memories with SHM's interface: `__call__(carry, x, resets, aux) -> (carry, y)`,
time-major, resets zero the state before step t, `initialize_carry` / `sample_aux` usable on the
unbound module (the aux input is unused: these memories need no per-step randomness)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def check_sequence(memory: str, x: jax.Array, resets: jax.Array | None) -> jax.Array:
    """resets [T, *batch] bool after checking that x is time-major [T, *batch, d] and resets has
    its [T, *batch] (None: no episode starts inside the sequence). A wrong shape raises a
    one-line ValueError that names `memory`, the shapes and the fix."""
    if x.ndim < 3:
        raise ValueError(
            f"{memory}: x must be time-major [T, *batch, d] (3 or more axes); got shape "
            f"{tuple(x.shape)}: add the time axis (x[None] for one step)"
        )
    if resets is None:
        return jnp.zeros(x.shape[:-1], bool)
    if tuple(resets.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"{memory}: resets must be [T, *batch] = {tuple(x.shape[:-1])} to match x "
            f"{tuple(x.shape)}; got {tuple(resets.shape)}"
        )
    return resets.astype(bool)


def check_carry(memory: str, carry: Any, expected: Any) -> None:
    """Raise a one-line ValueError unless `carry` has the tree structure and leaf shapes of
    `expected` (the module's `initialize_carry` for x's batch shape). Dtypes are not checked."""
    shapes = lambda tree: jax.tree.map(lambda a: tuple(jnp.shape(a)), tree)
    same_tree = jax.tree.structure(carry) == jax.tree.structure(expected)
    if not same_tree or shapes(carry) != shapes(expected):
        raise ValueError(
            f"{memory}: carry must have shapes {shapes(expected)} for this batch; got "
            f"{shapes(carry) if same_tree else jax.tree.structure(carry)}: make it with "
            f"initialize_carry(batch_shape) for the batch shape of x [T, *batch, d]"
        )


class _NoAux:
    def sample_aux(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """No per-step randomness: int32 zeros of `shape`."""
        del key
        return jnp.zeros(shape, jnp.int32)


class GRU(_NoAux, nn.Module):
    """A GRU (flax `GRUCell`, `size` hidden units) scanned over time with episode resets.

    `unroll`: time steps per iteration of the compiled loop (`nn.scan(unroll=...)`); only speed
    depends on it, never the numbers. None: 16 on a GPU, 1 elsewhere, the faster of the two on
    each (docs/performance.md)."""

    size: int
    features: int | None = None
    unroll: int | None = None
    dtype: Any = jnp.float32

    def initialize_carry(self, batch_shape: tuple[int, ...]) -> jax.Array:
        """Zero hidden state: [*batch_shape, size]."""
        return jnp.zeros((*batch_shape, self.size), self.dtype)

    @nn.compact
    def __call__(self, carry, x, resets, aux):
        """carry [B, size]; x [T, B, d]; resets [T, B]. Returns (carry, y [T, B, features])."""
        del aux
        resets = check_sequence("GRU", x, resets)
        check_carry("GRU", carry, self.initialize_carry(x.shape[1:-1]))

        def step(cell, h, inputs):
            xt, reset = inputs
            h = jnp.where(reset[..., None], 0.0, h)
            return cell(h, xt)

        unroll = self.unroll or (16 if jax.default_backend() == "gpu" else 1)
        scan = nn.scan(
            step, variable_broadcast="params", split_rngs={"params": False}, unroll=unroll
        )
        cell = nn.GRUCell(self.size, dtype=self.dtype, param_dtype=self.dtype)
        carry, y = scan(cell, carry, (x, resets))
        if self.features is not None and self.features != self.size:
            y = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.dtype)(y)
        return carry, y


def _lru_combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


class LRU(_NoAux, nn.Module):
    """Linear Recurrent Unit (Orvieto et al. 2023) over `jax.lax.associative_scan` with resets.

    h_t = λ ⊙ h_{t-1} + γ ⊙ (B x_t) with diagonal complex λ = exp(-exp(ν) + i·exp(φ)), |λ| drawn
    on the ring [r_min, r_max], γ = sqrt(1 - |λ|²) (the paper's normalisation); the block's output
    is y_t = GELU(Re(C h_t) + D ⊙ x̂_t) projected to `features`. A reset zeroes h before step t by
    zeroing λ_t in the scan element (exact, as the recurrence is linear).
    """

    size: int
    features: int | None = None
    r_min: float = 0.9
    r_max: float = 0.999
    max_phase: float = 6.28
    dtype: Any = jnp.float32

    def initialize_carry(self, batch_shape: tuple[int, ...]) -> jax.Array:
        """Zero complex state: [*batch_shape, size] complex64."""
        return jnp.zeros((*batch_shape, self.size), jnp.complex64)

    @nn.compact
    def __call__(self, carry, x, resets, aux):
        """carry [B, N] complex; x [T, B, d]; resets [T, B]. Returns (carry, y [T, B, features])."""
        del aux
        resets = check_sequence("LRU", x, resets)
        check_carry("LRU", carry, self.initialize_carry(x.shape[1:-1]))
        N, d = self.size, x.shape[-1]

        def ring_nu(key, shape):
            u = jax.random.uniform(key, shape)
            return jnp.log(-0.5 * jnp.log(u * (self.r_max**2 - self.r_min**2) + self.r_min**2))

        nu_log = self.param("nu_log", ring_nu, (N,))
        phase_log = self.param(
            "phase_log",
            lambda k, s: jnp.log(self.max_phase * jax.random.uniform(k, s)),
            (N,),
        )
        scale = lambda s: nn.initializers.normal(stddev=1.0 / jnp.sqrt(s))
        B_re = self.param("B_re", scale(2 * d), (N, d))
        B_im = self.param("B_im", scale(2 * d), (N, d))
        C_re = self.param("C_re", scale(N), (d, N))
        C_im = self.param("C_im", scale(N), (d, N))
        D = self.param("D", nn.initializers.normal(1.0), (d,))

        xh = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype)(x)
        lam = jnp.exp(-jnp.exp(nu_log) + 1j * jnp.exp(phase_log))  # [N]
        gamma = jnp.sqrt(1 - jnp.abs(lam) ** 2)
        Bu = gamma * ((B_re + 1j * B_im) @ xh[..., None].astype(jnp.complex64))[..., 0]
        a = jnp.broadcast_to(lam, Bu.shape) * (1 - resets[..., None].astype(jnp.float32))
        Bu = Bu.at[0].add(a[0] * carry)  # the carried state enters through the first write
        _, h = jax.lax.associative_scan(_lru_combine, (a, Bu), axis=0)  # [T, B, N]
        y = ((C_re + 1j * C_im) @ h[..., None])[..., 0].real + D * xh
        y = nn.gelu(y)
        y = nn.Dense(self.features or self.size, dtype=self.dtype, param_dtype=self.dtype)(y)
        return h[-1], y
