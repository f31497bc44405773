"""The SHM read with a hand-written backward pass (CPU training path) and a Pallas kernel (GPU).

Both compute, from per-step vectors only,

    M_t = C_t ⊙ M̃_{t-1} + e_t k_tᵀ,   C_t = 1 + tanh(θ_t c_tᵀ),   M̃_{t-1} = 0 if r_t else M_{t-1}
    Y_t = M_t q_t

so no [T, B, H, H] array is ever formed. The backward is the reverse-time recurrence of
`shared/spec/shm.md` ("The backward pass"), with G_t = ∂L/∂M_t:

    G_t  = dy_t q_tᵀ + P_t,          P_t = (1 − r_{t+1}) C_{t+1} ⊙ G_{t+1}   (P_T = dM_T)
    dq_t = M_tᵀ dy_t,   de_t = G_t k_t,   dk_t = G_tᵀ e_t
    S_t  = G_t ⊙ M̃_{t-1} ⊙ (1 − tanh²(θ_t c_tᵀ)),   dθ_t = S_t c_t,   dc_t = S_tᵀ θ_t
    dM_0 = P_0 = (1 − r_1) C_1 ⊙ G_1

The forward keeps M only at chunk starts ((T/chunk)·B·H² numbers); the backward recomputes one
chunk's states from its start at a time. M_{t-1} is never recovered from M_t by dividing by C_t
(C_t can be arbitrarily close to 0). Episode starts are selects, never products with (1 − r), so
an overflowed memory cannot leak 0 · inf = NaN into the next episode.

Both are `jax.custom_vjp` functions: reverse mode (grad, vjp) and vmap work, forward mode
(jvp, jacfwd) does not; use `shm.factored_read` (plain autodiff, same numbers) for that.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 32  # sqrt(T) for T = 1024; 8..64 measured within noise at T=128, B=64, H=32


def _outer(a, b):
    """a bᵀ for [..., H] vectors: [..., H, H]."""
    return a[..., :, None] * b[..., None, :]


def _matvec(M, v):
    """M v for M [..., H, H], v [..., H]. A batched dot: on XLA's CPU backend it measured faster
    than a fused multiply + reduce, whose reduction over the minor axis vectorises poorly."""
    return jnp.einsum("...ij,...j->...i", M, v)


def _vecmat(v, M):
    """Mᵀ v for M [..., H, H], v [..., H]."""
    return jnp.einsum("...ij,...i->...j", M, v)


def _step(M, theta, c, e, k, r):
    """One write: (M̃_{t-1}, M_t) from M_{t-1}; vectors [*batch, H], r [*batch] bool."""
    M_prev = jnp.where(r[..., None, None], jnp.zeros_like(M), M)
    return M_prev, (1 + jnp.tanh(_outer(theta, c))) * M_prev + _outer(e, k)


def _forward_chunk(M, xs):
    """Scan one chunk [L, *batch, H] forward from M; returns (M_last, Y [L, *batch, H])."""

    def step(M, x):
        theta, c, e, k, q, r = x
        M = _step(M, theta, c, e, k, r)[1]
        return M, _matvec(M, q)

    return jax.lax.scan(step, M, xs)


@jax.custom_vjp
def _fused(theta, c, e, k, q, resets, M0):
    """Chunked inputs [n, L, *batch, H] (resets [n, L, *batch]) -> (Y [n, L, *batch, H], M_last)."""
    M_last, Y = jax.lax.scan(_forward_chunk, M0, (theta, c, e, k, q, resets))
    return Y, M_last


def _fused_fwd(theta, c, e, k, q, resets, M0):
    def chunk(M, xs):
        M_last, Y = _forward_chunk(M, xs)
        return M_last, (Y, M)  # keep only the chunk's starting memory for the backward

    M_last, (Y, starts) = jax.lax.scan(chunk, M0, (theta, c, e, k, q, resets))
    return (Y, M_last), (theta, c, e, k, q, resets, starts)


def _fused_bwd(residuals, cotangents):
    theta, c, e, k, q, resets, starts = residuals
    dY, dM_last = cotangents

    def chunk(P, xs):
        """Backward through one chunk. P: ∂L/∂M at the chunk's end coming from the steps after
        it (P_T = dM_T for the last chunk); returns P at the chunk's start and the step grads."""
        M_start, theta, c, e, k, q, r, dy = xs

        def recompute(M, x):
            # The chunk's forward again from its checkpoint. dq_t = M_tᵀ dy_t needs only M_t, so
            # it is taken here; the reverse pass needs only M̃_{t-1}.
            theta, c, e, k, r, dy = x
            M_prev, M = _step(M, theta, c, e, k, r)
            return M, (M_prev, _vecmat(dy, M))

        _, (M_prev, dq) = jax.lax.scan(recompute, M_start, (theta, c, e, k, r, dy))

        def reverse(P, x):
            M_prev, theta, c, e, k, q, r, dy = x
            # tanh is recomputed rather than stored by `recompute`: measured as fast on CPU
            # (the step is memory-bound) and it halves the chunk's temporaries.
            th = jnp.tanh(_outer(theta, c))
            G = _outer(dy, q) + P
            S = G * M_prev * (1 - th * th)  # ∂L/∂(θ_t c_tᵀ); M_prev is already 0 after a reset
            grads = (_matvec(S, c), _vecmat(theta, S), _matvec(G, k), _vecmat(e, G))
            # P_{t-1} = (1 − r_t) C_t ⊙ G_t as a select, so that an inf in G cannot become a
            # NaN (0 · inf) that crosses an episode boundary.
            P = jnp.where(r[..., None, None], jnp.zeros_like(G), (1 + th) * G)
            return P, grads

        xs = (M_prev, theta, c, e, k, q, r, dy)
        P, (dtheta, dc, de, dk) = jax.lax.scan(reverse, P, xs, reverse=True)
        return P, (dtheta, dc, de, dk, dq)

    xs = (starts, theta, c, e, k, q, resets, dY)
    dM0, (dtheta, dc, de, dk, dq) = jax.lax.scan(chunk, dM_last, xs, reverse=True)
    return dtheta, dc, de, dk, dq, None, dM0


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_read(theta, c, eta_v, k, q, resets=None, memory=None, chunk: int = DEFAULT_CHUNK):
    """Y_t = M_t q_t for M_t = (1 + tanh(θ_t c_tᵀ)) ⊙ M̃_{t-1} + (η_t v_t) k_tᵀ, with the
    hand-written backward of the module docstring.

    Args:
      theta, c, eta_v, k, q: [T, *batch, H] per-step vectors (θ_t, c_t, η_t v_t, k_t, q_t).
      resets: [T, *batch] bool, True where step t starts a new episode (M̃_{t-1} = 0); None: none.
      memory: [*batch, H, H] memory carried in (zeros when None).
      chunk: steps between stored memories (capped at T). The forward keeps (T/chunk)·B·H²
        numbers for the backward, which recomputes chunk·B·H² at a time. Only memory use and
        speed depend on it, never the numbers.

    Returns:
      (Y [T, *batch, H], M_last [*batch, H, H]). Gradients flow to all vectors and `memory`;
      resets get none.
    """
    T, H = theta.shape[0], theta.shape[-1]
    batch = theta.shape[1:-1]
    if resets is None:
        resets = jnp.zeros((T, *batch), bool)
    if memory is None:
        memory = jnp.zeros((*batch, H, H), theta.dtype)
    size = max(1, min(chunk, T))
    n = math.ceil(T / size)
    pad = n * size - T
    # Zero padding is an identity step: tanh(0) = 0 gives C = 1, and e = 0 gives U = 0. The
    # padded steps come after step T-1, so they leave every Y_t and M_last unchanged.
    xs = tuple(
        jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a
        for a in (theta, c, eta_v, k, q, resets.astype(bool))
    )
    xs = tuple(a.reshape(n, size, *a.shape[1:]) for a in xs)
    Y, M_last = _fused(*xs, memory)
    return Y.reshape(n * size, *Y.shape[2:])[:T], M_last


# --- Pallas (GPU) -------------------------------------------------------------------------------
#
# One program owns a block of `block_b` sequences and keeps their H×H memories on chip for the
# whole sequence: HBM sees only the [T, B, H] vectors, M_0, M_last and the chunk checkpoints. The
# backward recomputes each chunk of `chunk` steps from its checkpoint with the chunk's states
# held on chip (a Python-unrolled list, so no state goes through HBM), then runs the reverse
# recurrence over the chunk. The backward's on-chip state per program is about
# (chunk + 2)·block_b·H² numbers. Tested in interpret mode on CPU only: the defaults are guesses,
# not measurements. H and block_b are padded / rounded to powers of two, which GPU (Triton)
# block shapes need; the padding is exact (θ = c = e = k = q = 0 rows keep M's padding at 0).

PALLAS_CHUNK = 8
PALLAS_BLOCK_B = 1


def _pallas_fwd_kernel(theta, c, e, k, q, r, m0, y, m_last, starts, *, chunk, n):
    """Refs: vectors [T, bB, H], r [T, bB] int32, m0 / m_last [bB, H, H], y [T, bB, H],
    starts [n, bB, H, H] (the memory before each chunk)."""

    def chunk_body(i, M):
        starts[i] = M

        def step(j, M):
            t = i * chunk + j
            M = jnp.where(r[t][:, None, None] != 0, jnp.zeros_like(M), M)
            th = jnp.tanh(theta[t][:, :, None] * c[t][:, None, :])
            M = (1 + th) * M + e[t][:, :, None] * k[t][:, None, :]
            y[t] = jnp.sum(M * q[t][:, None, :], axis=-1)
            return M

        return jax.lax.fori_loop(0, chunk, step, M)

    m_last[...] = jax.lax.fori_loop(0, n, chunk_body, m0[...])


def _pallas_bwd_kernel(
    theta, c, e, k, q, r, starts, dy, dm_last, dtheta, dc, de, dk, dq, dm0, *, chunk, n
):
    """The reverse recurrence of the module docstring, chunk by chunk from the last."""

    def chunk_body(ii, P):
        i = n - 1 - ii
        M = starts[i]
        M_prevs = []  # M̃_{t-1} for the chunk's steps, on chip
        for j in range(chunk):
            t = i * chunk + j
            M = jnp.where(r[t][:, None, None] != 0, jnp.zeros_like(M), M)
            M_prevs.append(M)
            M = (1 + jnp.tanh(theta[t][:, :, None] * c[t][:, None, :])) * M
            M = M + e[t][:, :, None] * k[t][:, None, :]
            dq[t] = jnp.sum(M * dy[t][:, :, None], axis=-2)  # M_tᵀ dy_t
        for j in reversed(range(chunk)):
            t = i * chunk + j
            M_prev = M_prevs[j]
            th = jnp.tanh(theta[t][:, :, None] * c[t][:, None, :])  # recomputed: less state
            G = dy[t][:, :, None] * q[t][:, None, :] + P
            S = G * M_prev * (1 - th * th)
            dtheta[t] = jnp.sum(S * c[t][:, None, :], axis=-1)
            dc[t] = jnp.sum(S * theta[t][:, :, None], axis=-2)
            de[t] = jnp.sum(G * k[t][:, None, :], axis=-1)
            dk[t] = jnp.sum(G * e[t][:, :, None], axis=-2)
            P = jnp.where(r[t][:, None, None] != 0, jnp.zeros_like(G), (1 + th) * G)
        return P

    dm0[...] = jax.lax.fori_loop(0, n, chunk_body, dm_last[...])


def _pallas_specs(T, n, bB, H):
    from jax.experimental import pallas as pl

    vec = pl.BlockSpec((T, bB, H), lambda b: (0, b, 0))
    flags = pl.BlockSpec((T, bB), lambda b: (0, b))
    mem = pl.BlockSpec((bB, H, H), lambda b: (b, 0, 0))
    ckpt = pl.BlockSpec((n, bB, H, H), lambda b: (0, b, 0, 0))
    return vec, flags, mem, ckpt


def _pallas_forward(theta, c, e, k, q, r, M0, chunk, bB, interpret):
    """Flat inputs [T, B, H] (T a multiple of chunk, B of bB; r int32 [T, B]) -> (Y, M_last, starts)."""
    from jax.experimental import pallas as pl

    T, B, H = theta.shape
    n = T // chunk
    vec, flags, mem, ckpt = _pallas_specs(T, n, bB, H)
    dt = theta.dtype
    return pl.pallas_call(
        functools.partial(_pallas_fwd_kernel, chunk=chunk, n=n),
        out_shape=(
            jax.ShapeDtypeStruct((T, B, H), dt),
            jax.ShapeDtypeStruct((B, H, H), dt),
            jax.ShapeDtypeStruct((n, B, H, H), dt),
        ),
        grid=(B // bB,),
        in_specs=[vec] * 5 + [flags, mem],
        out_specs=(vec, mem, ckpt),
        interpret=interpret,
    )(theta, c, e, k, q, r, M0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _pallas(theta, c, e, k, q, r, M0, chunk, bB, interpret):
    Y, M_last, _ = _pallas_forward(theta, c, e, k, q, r, M0, chunk, bB, interpret)
    return Y, M_last


def _pallas_vjp_fwd(theta, c, e, k, q, r, M0, chunk, bB, interpret):
    Y, M_last, starts = _pallas_forward(theta, c, e, k, q, r, M0, chunk, bB, interpret)
    return (Y, M_last), (theta, c, e, k, q, r, starts)


def _pallas_vjp_bwd(chunk, bB, interpret, residuals, cotangents):
    from jax.experimental import pallas as pl

    theta, c, e, k, q, r, starts = residuals
    dY, dM_last = cotangents
    T, B, H = theta.shape
    n = T // chunk
    vec, flags, mem, ckpt = _pallas_specs(T, n, bB, H)
    grads = pl.pallas_call(
        functools.partial(_pallas_bwd_kernel, chunk=chunk, n=n),
        out_shape=[jax.ShapeDtypeStruct((T, B, H), theta.dtype)] * 5
        + [jax.ShapeDtypeStruct((B, H, H), theta.dtype)],
        grid=(B // bB,),
        in_specs=[vec] * 5 + [flags, ckpt, vec, mem],
        out_specs=[vec] * 5 + [mem],
        interpret=interpret,
    )(theta, c, e, k, q, r, starts, dY, dM_last)
    return (*grads[:5], None, grads[5])


_pallas.defvjp(_pallas_vjp_fwd, _pallas_vjp_bwd)


def pallas_read(
    theta,
    c,
    eta_v,
    k,
    q,
    resets=None,
    memory=None,
    chunk: int = PALLAS_CHUNK,
    block_b: int = PALLAS_BLOCK_B,
    interpret: bool | None = None,
):
    """`fused_read` as a Pallas kernel (forward and backward), for the GPU.

    Args: as `fused_read`, plus
      chunk: steps between checkpoints; the backward holds one chunk's states on chip.
      block_b: sequences per program (the batch is padded to a multiple).
      interpret: run the kernels in Pallas' interpreter; None: on a CPU backend only.

    Returns:
      (Y [T, *batch, H], M_last [*batch, H, H]), the same numbers as `fused_read`.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    T, H = theta.shape[0], theta.shape[-1]
    batch = theta.shape[1:-1]
    B = math.prod(batch)
    if resets is None:
        resets = jnp.zeros((T, *batch), bool)
    if memory is None:
        memory = jnp.zeros((*batch, H, H), theta.dtype)
    chunk = max(1, min(chunk, T))
    bB = 1 << (max(1, min(block_b, B)).bit_length() - 1)  # a power of two, at most block_b
    Tp, Bp, Hp = math.ceil(T / chunk) * chunk, math.ceil(B / bB) * bB, 1 << (H - 1).bit_length()

    def pad(a, n_h):
        """[T, *batch, H…] -> [Tp, Bp, Hp…] (n_h trailing H axes), padded with zeros: identity
        steps, empty sequences, and H entries that stay zero."""
        a = a.reshape(T, B, *a.shape[1 + len(batch) :])
        return jnp.pad(a, [(0, Tp - T), (0, Bp - B)] + [(0, Hp - H)] * n_h)

    vectors = [pad(a, 1) for a in (theta, c, eta_v, k, q)]
    r = pad(resets.astype(jnp.int32), 0)  # int32: boolean refs are poorly supported by backends
    M0 = jnp.pad(memory.reshape(B, H, H), [(0, Bp - B), (0, Hp - H), (0, Hp - H)])
    Y, M_last = _pallas(*vectors, r, M0, chunk, bB, interpret)
    return Y[:T, :B, :H].reshape(T, *batch, H), M_last[:B, :H, :H].reshape(*batch, H, H)
