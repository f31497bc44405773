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
from typing import NamedTuple

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
# The recurrence is row-separable: row i of M_t needs only row i of M_{t-1}, θ_t[i], η_t v_t[i]
# and the whole c_t, k_t. So one program owns `block_rows` rows of the memories of `block_b`
# sequences, [bB, bR, H], and keeps them on chip for the whole sequence: HBM sees only the
# [T, B, H] vectors, M_0, M_last and the chunk checkpoints. The grid is (B / bB, H / bR), so
# even a small batch of large memories fills the GPU with programs.
#
# The backward recomputes each chunk of `chunk` steps from its checkpoint with the chunk's states
# held on chip (a Python-unrolled list, so no state goes through HBM), then runs the reverse
# recurrence over the chunk. dθ and dηv are row-local; dc, dk and dq are sums over all rows, so
# each row block writes its partial sum, [H / bR, T, B, H], and XLA adds them up. H, bR and bB
# are rounded to powers of two, which GPU (Triton) block shapes need; the padding is exact
# (θ = c = e = k = q = 0 keeps the padded rows and columns of M at 0).
#
# At a small batch a step's time is the wait for that step's inputs, so how a chunk reads its
# vectors and writes its outputs is a choice of its own (`_chunk_loop`, the same for both
# kernels): "step" loads each step's vectors where they are used and stores at once; "prefetch"
# issues all of the chunk's per-step loads before its arithmetic and holds its stores until
# after it; "pipelined" loads each input's whole chunk [chunk, ...] in one go, one chunk ahead
# (the next chunk's loads are in flight while this one computes: double buffering through the
# loop carry), and stores each output once per chunk.


def _power_of_two_at_most(n: int, cap: int) -> int:
    return 1 << (max(1, min(n, cap)).bit_length() - 1)


PALLAS_CHUNK = 8  # steps per chunk where the batch fills the GPU
PALLAS_CHUNK_STARVED = 4  # ... and where it does not (`pallas_blocks`)
PALLAS_BLOCK_B = 1
PALLAS_MIN_PROGRAMS = 264  # 2 per streaming multiprocessor of an H100 (132)
IO_MODES = ("step", "prefetch", "pipelined")


class PallasConfig(NamedTuple):
    """A Pallas kernel configuration (`pallas_read`'s arguments of the same names)."""

    block_b: int  # sequences per program
    block_rows: int  # rows of each H×H memory per program
    chunk: int  # steps between checkpoints; the backward holds one chunk's states on chip
    num_warps: int  # Triton warps per program
    prefetch: bool  # a chunk's loads before its arithmetic, its stores after it


def pallas_blocks(B: int, H: int, block_b: int = PALLAS_BLOCK_B) -> PallasConfig:
    """The default kernel configuration for B sequences of H×H memories.

    - Rows and warps: whole rows (bR = H) when the batch alone gives `PALLAS_MIN_PROGRAMS`
      programs, else fewer rows per program (down to 8) until there are that many; 2 warps for
      up to 1024 memory entries per program, 4 above. The best configs of the H100 sweep at
      (T, B, H) = (1024, 8, 128) and (1024, 512, 32).
    - Prefetch and chunk: where whole rows would give fewer than `PALLAS_MIN_PROGRAMS` programs
      (the batch is too small to fill the GPU, so each step waits on its own loads), the
      chunk's loads go first (prefetch) and chunks are `PALLAS_CHUNK_STARVED` = 4 steps: at
      (1024, 8, 128) on an H200, 8 rows × 2 warps, this trained the read 2.2x faster than
      chunks of 8 without prefetch (prefetch 1.5x, then chunk 4 1.5x; chunk 16 was 3.8x
      slower). That is the only size of this kind measured; others get the rule on the same
      reasoning. Where the batch fills the GPU, e.g. (1024, 512, 32), prefetch and other
      chunks are not measured, so it keeps `PALLAS_CHUNK` = 8 steps without prefetch, the
      H100 sweep's best there. `bench/memory.py
      --pallas-sweep` measures both (docs/performance.md, "Pallas kernel configuration")."""
    bB = _power_of_two_at_most(block_b, B)
    Hp = bR = 1 << (H - 1).bit_length()
    programs = -(-B // bB)  # with whole rows
    while bR > 8 and programs * Hp // bR < PALLAS_MIN_PROGRAMS:
        bR //= 2
    warps = 2 if bB * bR * Hp <= 1024 else 4
    starved = programs < PALLAS_MIN_PROGRAMS
    return PallasConfig(bB, bR, PALLAS_CHUNK_STARVED if starved else PALLAS_CHUNK, warps, starved)


class _Launch(NamedTuple):
    """What the kernels are compiled for (static: a custom_vjp nondiff argument)."""

    chunk: int
    block_b: int
    block_rows: int
    num_warps: int
    interpret: bool
    io: str  # one of IO_MODES


def _where_reset(r, M):
    """M̃ = 0 where the step starts an episode (a select, so an inf M cannot make a NaN)."""
    return jnp.where(r[:, None, None] != 0, jnp.zeros_like(M), M)


def _split_steps(block, chunk):
    """A chunk's block [chunk, ...] -> its `chunk` steps [...], by a power-of-two split (which
    Triton lowers; it has no slicing of loaded values)."""
    return [jnp.squeeze(part, 0) for part in jnp.split(block, chunk)]


def _stack_steps(values):
    """`chunk` steps [...] -> their block [chunk, ...], by selects (Triton concatenates only
    pairs along the last axis)."""
    first = values[0]
    pos = jnp.arange(len(values), dtype=jnp.int32).reshape(-1, *(1,) * first.ndim)
    block = jnp.broadcast_to(first[None], (len(values), *first.shape))
    for j, value in enumerate(values[1:], 1):
        block = jnp.where(pos == j, value[None], block)
    return block


def _held_stores(write):
    """(store, flush): store(ref, j, value) holds the value; flush() then calls write(ref,
    {j: value}) once per output ref, in the order of their first stores."""
    held = []  # (ref, {j: value}); refs compare by identity

    def store(ref, j, value):
        for seen, values in held:
            if seen is ref:
                values[j] = value
                return
        held.append((ref, {j: value}))

    def flush():
        for ref, values in held:
            write(ref, values)

    return store, flush


def _chunk_loop(n, chunk, io, ins, body, init, reverse=False):
    """Run `body(i, load, store, carry) -> carry` over the n chunks i of `chunk` steps (the last
    first when `reverse`) and return the final carry. In the body, load(j) is the tuple of
    ins[·][i·chunk + j] and store(ref, j, value) writes ref[i·chunk + j] = value, each as `io`
    says (the comment above): "step" (at once), "prefetch" (loads first, stores held until the
    body ends) or "pipelined" (whole-chunk loads one chunk ahead, one store per output)."""
    from jax.experimental import pallas as pl

    order = (lambda ii: n - 1 - ii) if reverse else (lambda ii: ii)

    def step(ii, carry):
        i = order(ii)
        at = lambda j: i * chunk + j
        if io == "step":

            def store(ref, j, value):
                ref[at(j)] = value

            return body(i, lambda j: tuple(ref[at(j)] for ref in ins), store, carry)

        loaded = [tuple(ref[at(j)] for ref in ins) for j in range(chunk)]

        def write(ref, values):
            for j, value in values.items():
                ref[at(j)] = value

        store, flush = _held_stores(write)
        carry = body(i, lambda j: loaded[j], store, carry)
        flush()
        return carry

    if io != "pipelined":
        return jax.lax.fori_loop(0, n, step, init)

    def load_block(i):
        return tuple(ref[pl.ds(i * chunk, chunk)] for ref in ins)

    def pipelined_step(ii, state):
        carry, current = state
        upcoming = load_block(order(jnp.minimum(ii + 1, n - 1)))  # in flight during this chunk
        i = order(ii)
        steps = [_split_steps(block, chunk) for block in current]

        def write(ref, values):
            ref[pl.ds(i * chunk, chunk)] = _stack_steps([values[j] for j in range(chunk)])

        store, flush = _held_stores(write)
        carry = body(i, lambda j: tuple(s[j] for s in steps), store, carry)
        flush()
        return carry, upcoming

    return jax.lax.fori_loop(0, n, pipelined_step, (init, load_block(order(0))))[0]


def _pallas_fwd_kernel(theta, c, e, k, q, r, m0, y, m_last, starts, *, chunk, n, io):
    """One program's refs: its rows θ, e, y [T, bB, bR]; c, k, q [T, bB, H]; r [T, bB] int32;
    m0, m_last [bB, bR, H]; starts [n, bB, bR, H] (the memory before each chunk)."""

    def chunk_body(i, load, store, M):
        starts[i] = M
        for j in range(chunk):
            r_t, theta_t, c_t, e_t, k_t, q_t = load(j)
            M = _where_reset(r_t, M)
            th = jnp.tanh(theta_t[:, :, None] * c_t[:, None, :])
            M = (1 + th) * M + e_t[:, :, None] * k_t[:, None, :]
            store(y, j, jnp.sum(M * q_t[:, None, :], axis=-1))
        return M

    m_last[...] = _chunk_loop(n, chunk, io, (r, theta, c, e, k, q), chunk_body, m0[...])


def _pallas_bwd_kernel(
    theta, c, e, k, q, r, starts, dy, dm_last, dtheta, dc, de, dk, dq, dm0, *, chunk, n, io
):
    """The reverse recurrence of the module docstring, chunk by chunk from the last. Row-local
    outputs dθ, de [T, bB, bR] and dm0 [bB, bR, H]; partial sums over this program's rows
    dc, dk, dq [T, bB, H]."""

    def chunk_body(i, load, store, P):
        M = starts[i]
        M_prevs = []  # M̃_{t-1} for the chunk's steps, on chip
        for j in range(chunk):
            r_t, theta_t, c_t, e_t, k_t, _, dy_t = load(j)
            M = _where_reset(r_t, M)
            M_prevs.append(M)
            M = (1 + jnp.tanh(theta_t[:, :, None] * c_t[:, None, :])) * M
            M = M + e_t[:, :, None] * k_t[:, None, :]
            store(dq, j, jnp.sum(M * dy_t[:, :, None], axis=-2))  # (M_tᵀ dy_t) over these rows
        for j in reversed(range(chunk)):
            r_t, theta_t, c_t, e_t, k_t, q_t, dy_t = load(j)
            th = jnp.tanh(theta_t[:, :, None] * c_t[:, None, :])  # recomputed: less state
            G = dy_t[:, :, None] * q_t[:, None, :] + P
            S = G * M_prevs[j] * (1 - th * th)
            store(dtheta, j, jnp.sum(S * c_t[:, None, :], axis=-1))
            store(dc, j, jnp.sum(S * theta_t[:, :, None], axis=-2))
            store(de, j, jnp.sum(G * k_t[:, None, :], axis=-1))
            store(dk, j, jnp.sum(G * e_t[:, :, None], axis=-2))
            P = _where_reset(r_t, (1 + th) * G)
        return P

    ins = (r, theta, c, e, k, q, dy)
    dm0[...] = _chunk_loop(n, chunk, io, ins, chunk_body, dm_last[...], reverse=True)


def _pallas_call(kernel, out_shape, in_specs, out_specs, grid, launch: _Launch):
    from jax.experimental import pallas as pl

    params = {}
    if not launch.interpret:
        from jax.experimental.pallas import triton as plt

        params["compiler_params"] = plt.CompilerParams(num_warps=launch.num_warps, num_stages=1)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=launch.interpret,
        **params,
    )


def _pallas_specs(T, n, H, bB, bR):
    """BlockSpecs over the grid (batch block b, row block i)."""
    from jax.experimental import pallas as pl

    squeezed = getattr(pl, "squeezed", None)
    return dict(
        rows=pl.BlockSpec((T, bB, bR), lambda b, i: (0, b, i)),
        full=pl.BlockSpec((T, bB, H), lambda b, i: (0, b, 0)),
        flags=pl.BlockSpec((T, bB), lambda b, i: (0, b)),
        mem=pl.BlockSpec((bB, bR, H), lambda b, i: (b, i, 0)),
        ckpt=pl.BlockSpec((n, bB, bR, H), lambda b, i: (0, b, i, 0)),
        partial=pl.BlockSpec((squeezed, T, bB, H), lambda b, i: (i, 0, b, 0)),
    )


def _pallas_forward(theta, c, e, k, q, r, M0, launch: _Launch):
    """Flat inputs [T, B, H] (T a multiple of chunk, B of bB, H of bR; r int32 [T, B]) ->
    (Y, M_last, starts)."""
    T, B, H = theta.shape
    n, bB, bR = T // launch.chunk, launch.block_b, launch.block_rows
    s = _pallas_specs(T, n, H, bB, bR)
    dt = theta.dtype
    return _pallas_call(
        functools.partial(_pallas_fwd_kernel, chunk=launch.chunk, n=n, io=launch.io),
        out_shape=(
            jax.ShapeDtypeStruct((T, B, H), dt),
            jax.ShapeDtypeStruct((B, H, H), dt),
            jax.ShapeDtypeStruct((n, B, H, H), dt),
        ),
        in_specs=[s["rows"], s["full"], s["rows"], s["full"], s["full"], s["flags"], s["mem"]],
        out_specs=(s["rows"], s["mem"], s["ckpt"]),
        grid=(B // bB, H // bR),
        launch=launch,
    )(theta, c, e, k, q, r, M0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _pallas(theta, c, e, k, q, r, M0, launch):
    Y, M_last, _ = _pallas_forward(theta, c, e, k, q, r, M0, launch)
    return Y, M_last


def _pallas_vjp_fwd(theta, c, e, k, q, r, M0, launch):
    Y, M_last, starts = _pallas_forward(theta, c, e, k, q, r, M0, launch)
    return (Y, M_last), (theta, c, e, k, q, r, starts)


def _pallas_vjp_bwd(launch, residuals, cotangents):
    theta, c, e, k, q, r, starts = residuals
    dY, dM_last = cotangents
    T, B, H = theta.shape
    n, bB, bR = T // launch.chunk, launch.block_b, launch.block_rows
    nR = H // bR
    s = _pallas_specs(T, n, H, bB, bR)
    vec = jax.ShapeDtypeStruct((T, B, H), theta.dtype)
    partial = jax.ShapeDtypeStruct((nR, T, B, H), theta.dtype)
    dtheta, dc, de, dk, dq, dM0 = _pallas_call(
        functools.partial(_pallas_bwd_kernel, chunk=launch.chunk, n=n, io=launch.io),
        out_shape=[vec, partial, vec, partial, partial, jax.ShapeDtypeStruct((B, H, H), vec.dtype)],
        in_specs=[s["rows"], s["full"], s["rows"], s["full"], s["full"], s["flags"], s["ckpt"]]
        + [s["rows"], s["mem"]],
        out_specs=[s["rows"], s["partial"], s["rows"], s["partial"], s["partial"], s["mem"]],
        grid=(B // bB, nR),
        launch=launch,
    )(theta, c, e, k, q, r, starts, dY, dM_last)
    return dtheta, dc.sum(0), de, dk.sum(0), dq.sum(0), None, dM0


_pallas.defvjp(_pallas_vjp_fwd, _pallas_vjp_bwd)


def pallas_read(
    theta,
    c,
    eta_v,
    k,
    q,
    resets=None,
    memory=None,
    chunk: int | None = None,
    block_b: int = PALLAS_BLOCK_B,
    block_rows: int | None = None,
    num_warps: int | None = None,
    prefetch: bool | None = None,
    pipelined: bool = False,
    interpret: bool | None = None,
):
    """`fused_read` as a Pallas kernel (forward and backward), for the GPU.

    Args: as `fused_read`, plus (None: `pallas_blocks`' choice for the size)
      chunk: steps between checkpoints; the backward holds one chunk's states on chip.
      block_b: sequences per program (the batch is padded to a multiple; rounded down to a power
        of two).
      block_rows: rows of each H×H memory per program (rounded down to a power of two, at most
        H rounded up to one). The grid is (B / block_b, H / block_rows).
      num_warps: Triton warps per program (GPU only).
      prefetch: load each chunk's vectors before its arithmetic and store its outputs after it
        (same numbers).
      pipelined: load each input's whole chunk in one go, one chunk ahead of the arithmetic
        (double buffering), and store each output once per chunk (same numbers; `prefetch`
        does not apply). The chunk is rounded down to a power of two (a Triton block shape).
        Not yet timed on a GPU, so opt-in: `bench/memory.py --pallas-sweep` measures it.
      interpret: run the kernels in Pallas' interpreter; None: on a CPU backend only.

    Returns:
      (Y [T, *batch, H], M_last [*batch, H, H]), the same numbers as `fused_read`.
    """
    sizes = (("chunk", chunk), ("block_b", block_b), ("block_rows", block_rows))
    for name, value in (*sizes, ("num_warps", num_warps)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"pallas_read: {name} must be a positive int; got {value!r}")
    for name, value in (("prefetch", prefetch), ("pipelined", pipelined)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"pallas_read: {name} must be True or False; got {value!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    T, H = theta.shape[0], theta.shape[-1]
    batch = theta.shape[1:-1]
    B = math.prod(batch)
    if resets is None:
        resets = jnp.zeros((T, *batch), bool)
    if memory is None:
        memory = jnp.zeros((*batch, H, H), theta.dtype)
    auto = pallas_blocks(B, H, block_b)
    chunk = max(1, min(auto.chunk if chunk is None else chunk, T))
    if pipelined:
        chunk = _power_of_two_at_most(chunk, chunk)
    Hp = 1 << (H - 1).bit_length()
    bB = auto.block_b
    bR = auto.block_rows if block_rows is None else _power_of_two_at_most(block_rows, Hp)
    prefetch = auto.prefetch if prefetch is None else prefetch
    io = "pipelined" if pipelined else "prefetch" if prefetch else "step"
    Tp, Bp = math.ceil(T / chunk) * chunk, math.ceil(B / bB) * bB

    def pad(a, n_h):
        """[T, *batch, H…] -> [Tp, Bp, Hp…] (n_h trailing H axes), padded with zeros: identity
        steps, empty sequences, and H entries that stay zero."""
        a = a.reshape(T, B, *a.shape[1 + len(batch) :])
        return jnp.pad(a, [(0, Tp - T), (0, Bp - B)] + [(0, Hp - H)] * n_h)

    vectors = [pad(a, 1) for a in (theta, c, eta_v, k, q)]
    r = pad(resets.astype(jnp.int32), 0)  # int32: boolean refs are poorly supported by backends
    M0 = jnp.pad(memory.reshape(B, H, H), [(0, Bp - B), (0, Hp - H), (0, Hp - H)])
    warps = auto.num_warps if num_warps is None else num_warps
    launch = _Launch(chunk, bB, bR, int(warps), bool(interpret), io)
    Y, M_last = _pallas(*vectors, r, M0, launch)
    return Y[:T, :B, :H].reshape(T, *batch, H), M_last[:B, :H, :H].reshape(*batch, H, H)
