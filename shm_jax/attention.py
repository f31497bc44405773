"""A one-layer GPT-2-style causal self-attention over a sliding window of the current episode,
time-major, with a KV cache as its carry (Radford et al. 2019's block: pre-LayerNorm, residual
attention and MLP; Vaswani et al. 2017's sinusoidal positions).

One step t of an episode, input x_t, position p_t (the step's index in its episode):

    e_t = W_e x_t + b_e + PE(p_t)                          PE: sinusoidal, width D
    a_t = e_t + W_a Attn(LN_1(e_t); the last `window` steps of the episode and step t itself)
    z_t = a_t + MLP(LN_2(a_t))                             MLP: D -> 4D -> D, GELU
    y_t = W_o LN_f(z_t) + b_o

Attn is multi-head causal attention whose keys and values are those of step t and of up to
`window` earlier steps of the same episode. Positions are absolute within the episode and
sinusoidal, so they need no table and any episode length works; a learned table would need a
maximum episode length. The carry is the keys and values of the last `window` steps, which of
them belong to the current episode, and the episode's step count; an episode start empties it.

The whole-sequence form attends in blocks of L = min(T, window) queries, each to its L + window
keys (banded, O(T · window) work and memory), and gives the same numbers as T calls of one step.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from shm_jax.baselines import _NoAux, check_carry, check_sequence


class AttentionCarry(NamedTuple):
    """The KV cache per env, slot W − 1 the newest step: keys, values [*batch, W, heads, d_h]
    (zero where not valid), valid [*batch, W] bool (the slot holds a step of the current episode)
    and steps [*batch] int32 (steps of the current episode so far: the next step's position)."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    steps: jax.Array


def episode_positions(resets: jax.Array, steps: jax.Array) -> jax.Array:
    """p_t [T, *batch] int32, step t's index in its episode: resets [T, *batch] bool; steps
    [*batch], the steps the carried-in episode already had."""
    T = resets.shape[0]
    idx = jnp.arange(T, dtype=jnp.int32).reshape(T, *([1] * (resets.ndim - 1)))
    last_reset = jax.lax.cummax(jnp.where(resets, idx, -1), axis=0)
    return jnp.where(last_reset >= 0, idx - last_reset, steps.astype(jnp.int32) + idx)


def sinusoid(positions: jax.Array, width: int, dtype=jnp.float32) -> jax.Array:
    """PE [..., width] of positions [...]: sin(p f_i) at even i, cos(p f_i) at odd i, with
    f_i = 10000^(−2⌊i/2⌋ / width) (Vaswani et al. 2017, Sec. 3.5)."""
    i = jnp.arange(width)
    freq = jnp.power(10000.0, -(2 * (i // 2)) / width).astype(dtype)
    angle = positions[..., None].astype(dtype) * freq
    return jnp.where(i % 2 == 0, jnp.sin(angle), jnp.cos(angle))


def window_attention(q, k, v, resets, cache_k, cache_v, cache_valid):
    """Causal attention of each step over itself and up to W earlier steps of its episode.

    q, k, v [T, *batch, heads, d_h]; resets [T, *batch] bool; cache_k, cache_v [*batch, W,
    heads, d_h] and cache_valid [*batch, W] bool, the W steps before the sequence (newest last).
    Queries go in blocks of L = min(T, W) (time padded to a multiple of L); block i attends to
    the L + W keys that end with it, masked to the band, the episode and the valid slots.
    Returns (out [T, *batch, heads, d_h], new keys, values [*batch, W, heads, d_h], new valid
    [*batch, W])."""
    T, W, nb = q.shape[0], cache_k.shape[-3], q.ndim - 3
    L = min(T, W) if W else 1
    n = math.ceil(T / L)
    pad = lambda a: jnp.concatenate([a, jnp.zeros((n * L - T, *a.shape[1:]), a.dtype)])
    ep = jnp.cumsum(resets.astype(jnp.int32), axis=0)  # episodes started up to step t
    # everything on one time axis [W + nL]: the cache first, then the sequence
    k_all = jnp.concatenate([jnp.moveaxis(cache_k, -3, 0).astype(k.dtype), pad(k)])
    v_all = jnp.concatenate([jnp.moveaxis(cache_v, -3, 0).astype(v.dtype), pad(v)])
    valid_all = jnp.concatenate([jnp.moveaxis(cache_valid, -1, 0), jnp.ones_like(pad(resets))])
    ep_all = jnp.concatenate([jnp.zeros((W, *ep.shape[1:]), ep.dtype), pad(ep)])
    idx = L * jnp.arange(n)[:, None] + jnp.arange(W + L)[None, :]  # [n, W+L] keys of block i
    q_blocks = pad(q).reshape(n, L, *q.shape[1:])
    scores = jnp.einsum("nr...hd,nj...hd->nrj...h", q_blocks, k_all[idx]) / math.sqrt(q.shape[-1])
    r, j = jnp.arange(L)[:, None], jnp.arange(W + L)[None, :]
    band = ((j >= r) & (j <= W + r)).reshape(1, L, W + L, *([1] * nb))  # key j of query r
    same_episode = ep_all[W:].reshape(n, L, *ep.shape[1:])[:, :, None] == ep_all[idx][:, None]
    mask = band & same_episode & valid_all[idx][:, None]  # [n, L, W+L, *batch]
    scores = jnp.where(mask[..., None], scores, jnp.finfo(scores.dtype).min)
    weights = jnp.where(mask[..., None], jax.nn.softmax(scores, axis=2), 0.0)
    out = jnp.einsum("nrj...h,nj...hd->nr...hd", weights, v_all[idx])
    out = out.reshape(n * L, *q.shape[1:])[:T]
    # the new cache: the last W steps, kept where they belong to the last step's episode
    keep = valid_all[T : T + W] & (ep_all[T : T + W] == ep_all[W + T - 1])
    tail = lambda a: jnp.moveaxis(jnp.where(keep[..., None, None], a[T : T + W], 0.0), 0, -3)
    return out, tail(k_all), tail(v_all), jnp.moveaxis(keep, 0, -1)


class Attention(_NoAux, nn.Module):
    """One-layer causal self-attention over a window of the episode: `__call__(carry, x, resets,
    aux) -> (carry, y)`, time-major.

    Attributes:
      size: D, the model width (the residual stream; heads · d_h).
      features: output width (defaults to `size`).
      num_heads: attention heads; None: 4 when 4 divides `size`, else the largest divisor of
        `size` below 4 (so every `size` builds). A given value must divide `size`.
      window: W, the earlier steps of the episode each step attends to (besides itself). 64 by
        default: the KV cache then holds 2 · 64 · D = H² floats at D = H = 128, SHM's memory at
        the paper's POPGym size. State per env: 2 · W · D + W + 1 (the valid flags, the count).
      dtype: parameter and computation dtype.
    """

    size: int
    features: int | None = None
    num_heads: int | None = None
    window: int = 64
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.size < 1 or self.window < 0:
            raise ValueError(
                f"Attention: size must be >= 1 and window >= 0; got {self.size}, {self.window}"
            )
        if self.num_heads is not None and (self.num_heads < 1 or self.size % self.num_heads):
            raise ValueError(
                f"Attention: num_heads must divide size; got num_heads={self.num_heads}, "
                f"size={self.size} (or pass num_heads=None)"
            )
        super().__post_init__()

    @property
    def heads(self) -> int:
        if self.num_heads is not None:
            return self.num_heads
        return max(h for h in (1, 2, 3, 4) if self.size % h == 0)

    def initialize_carry(self, batch_shape: tuple[int, ...]) -> AttentionCarry:
        """An empty cache: zero keys and values [*batch, W, heads, d_h], no valid slot, 0 steps."""
        kv = (*batch_shape, self.window, self.heads, self.size // self.heads)
        return AttentionCarry(
            keys=jnp.zeros(kv, self.dtype),
            values=jnp.zeros(kv, self.dtype),
            valid=jnp.zeros((*batch_shape, self.window), bool),
            steps=jnp.zeros(batch_shape, jnp.int32),
        )

    @nn.compact
    def __call__(self, carry, x, resets=None, aux=None):
        """carry `AttentionCarry`; x [T, B, d]; resets [T, B] bool (None: no episode starts).

        Returns (carry after the last step, y [T, B, features])."""
        del aux
        resets = check_sequence("Attention", x, resets)
        check_carry("Attention", carry, self.initialize_carry(x.shape[1:-1]))
        D, h = self.size, self.heads
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.dtype, name=name)
        norm = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype, name=name)
        heads = lambda a: a.reshape(*a.shape[:-1], h, D // h)  # [T, B, D] -> [T, B, heads, d_h]

        positions = episode_positions(resets, carry.steps)  # [T, B]
        e = dense(D, "embed")(x) + sinusoid(positions, D, self.dtype)  # [T, B, D]
        e_norm = norm("ln_1")(e)
        q, k, v = (heads(dense(D, name)(e_norm)) for name in ("query", "key", "value"))
        attended, keys, values, valid = window_attention(
            q, k, v, resets, carry.keys, carry.values, jnp.asarray(carry.valid, bool)
        )
        a = e + dense(D, "attn_out")(attended.reshape(*attended.shape[:-2], D))
        z = a + dense(D, "mlp_out")(nn.gelu(dense(4 * D, "mlp_in")(norm("ln_2")(a))))
        y = dense(self.features or D, "out")(norm("ln_f")(z))
        chex.assert_shape(y, (*x.shape[:-1], self.features or D))
        return AttentionCarry(keys, values, valid, positions[-1] + 1), y
