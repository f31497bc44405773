"""The Hadamard recurrence M_t = C_t ⊙ M_{t-1} + U_t as pure functions (time-major).

Three forms give the same numbers (Le et al. 2025, Sec. 3; `shared/spec/shm.md`):

- "sequential": one `lax.scan` step per time step. Least work; fastest on a CPU.
- "associative": `lax.associative_scan` over the pairs (C_t, U_t) with the operator
  (A1, B1) ∘ (A2, B2) = (A1 ⊙ A2, A2 ⊙ B1 + B2): O(log T) depth, but it materialises every M_t
  (T·B·H² numbers) several times. Pays off on a GPU/TPU.
- "chunked": sequential across chunks of `chunk_size` steps, associative inside a chunk, the
  read-out M_t q_t taken inside so no full M_t leaves its chunk.

Episode starts: `resets[t]` True means the memory restarts from zero before step t's write, so
M_t = U_t. Always by a select, never by multiplying with (1 − reset_t): a memory that overflowed
to inf in one episode would otherwise give 0 · inf = NaN in the next. The sequential step uses
M_t = C_t ⊙ select(r_t, 0, M_{t-1}) + U_t; the associative forms carry the flag in the element,
(A1, B1, r1) ∘ (A2, B2, r2) = (A2 ⊙ sel(r2, 1, A1), A2 ⊙ sel(r2, 0, B1) + B2, r1 ∨ r2) (selecting
before multiplying keeps the inf out of the gradients, too). A memory carried in from the
previous segment is folded into the first write: U_0 += C_0 ⊙ select(r_0, 0, M_prev).

Training memory: `hadamard_read` with "sequential" or "chunked" wraps every chunk in
`jax.checkpoint`, so the backward pass keeps only the H×H memory at chunk boundaries and
recomputes each chunk's states, instead of storing every M_t (T·B·H² floats).

"auto" picks by backend and size:
- CPU: always "sequential" (the fastest method at every size measured with `bench/memory.py`,
  2-9x ahead of "associative"; the SHM layer runs it as `shm_jax.kernel.fused_read`).
- GPU/TPU: "associative" whenever its memory fits a budget: the scan keeps about 4 copies of all
  M_t, so T·B·H² · 4 bytes · 4 ≤ 8 GiB (`ASSOCIATIVE_BUDGET_BYTES`), i.e. T·B·H² ≤ 2**29
  float32 numbers; else "chunked" with chunks of 64 steps, whose memory is bounded by the chunk.
  On a GPU the associative scan was the fastest of the three forms at every size measured
  (docs/performance.md), so the budget only guards memory. (The SHM layer's "auto"
  runs the Pallas kernel of `shm_jax.kernel` on a GPU instead, where it applies:
  `shm_jax.shm.layer_method`.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

METHODS = ("auto", "sequential", "associative", "chunked")
DEFAULT_CHUNK = 64
ASSOCIATIVE_BUDGET_BYTES = 8 * 2**30
# Copies of all M_t the associative scan keeps alive: about 4 (fwd+bwd measured 6 on CPU, see
# tests/test_scan.py::test_training_memory_is_bounded; the budget leaves room for that).
_ASSOCIATIVE_COPIES = 4


def _validate(C, U, q, resets, memory, method, chunk_size):
    if method not in METHODS:
        raise ValueError(f"unknown scan method {method!r}; choose one of {', '.join(METHODS)}")
    if C.ndim < 3 or C.shape[-1] != C.shape[-2]:
        raise ValueError(f"C must have shape [T, *batch, H, H]; got {C.shape}")
    if U.shape != C.shape:
        raise ValueError(f"U must have C's shape {C.shape}; got {U.shape}")
    if q is not None and q.shape != C.shape[:-1]:
        raise ValueError(f"q must have shape [T, *batch, H] = {C.shape[:-1]}; got {q.shape}")
    if resets is not None and resets.shape != C.shape[:-2]:
        raise ValueError(f"resets must have shape [T, *batch] = {C.shape[:-2]}; got {resets.shape}")
    if memory is not None and memory.shape != C.shape[1:]:
        raise ValueError(
            f"memory must have shape [*batch, H, H] = {C.shape[1:]}; got {memory.shape}"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")


def choose_method(T: int, batch: int, H: int, backend: str | None = None) -> str:
    """The method "auto" resolves to for T steps, `batch` sequences and H×H memories."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "sequential"
    footprint = T * batch * H * H * 4 * _ASSOCIATIVE_COPIES  # float32 bytes
    return "associative" if footprint <= ASSOCIATIVE_BUDGET_BYTES else "chunked"


def fold_memory(C, U, resets, memory):
    """Fold the carried state into the first write, U_0 += C_0 ⊙ M̃_prev, so that a scan can
    start from M = 0 (M̃_prev = 0 when step 0 resets). Any state with two trailing axes: SHM's
    H × H, FFM's m × c, S6's D × N."""
    if memory is None:
        return U
    return U.at[0].add(C[0] * _drop(None if resets is None else resets[0], memory, 0))


def _drop(reset, x, value):
    """x where no episode starts, else `value`: reset [*batch] bool (None: none), x [*batch, H, H].

    A select, not a product with (1 − reset): a memory that overflowed to inf in one episode
    must not make 0 · inf = NaN in the next one, in the values nor in the gradients (selecting
    before multiplying keeps the inf out of both)."""
    if reset is None:
        return x
    return jnp.where(reset[..., None, None], jnp.asarray(value, x.dtype), x)


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _combine_resets(left, right):
    """The operator with the reset flag of the spec: a reset in the right element discards
    everything on its left."""
    a1, b1, r1 = left
    a2, b2, r2 = right
    return a2 * _drop(r2, a1, 1), a2 * _drop(r2, b1, 0) + b2, r1 | r2


def affine_scan(C, U, resets=None):
    """Every M_t = C_t ⊙ M_{t-1} + U_t from zero initial state, with resets (the state is zeroed
    before a step that starts an episode), as one `jax.lax.associative_scan`: [T, *batch, a, b]
    for C, U of that shape (the diagonal recurrences of SHM, FFM and S6 alike)."""
    if resets is None:
        return jax.lax.associative_scan(_combine, (C, U), axis=0)[1]
    return jax.lax.associative_scan(_combine_resets, (C, U, resets), axis=0)[1]


def _associative_from(M, c, u, r):
    """Every state of one chunk [t, *batch, H, H], starting from the carried memory M."""
    return affine_scan(c, u.at[0].add(c[0] * _drop(None if r is None else r[0], M, 0)), r)


def _sequential_step(M, x):
    """M_t = C_t ⊙ M̃_{t-1} + U_t for x = (C_t, U_t, r_t)."""
    c, u, r = x
    return c * _drop(r, M, 0) + u


def _read(M, q):
    return jnp.einsum("...ij,...j->...i", M, q)


def _chunk_read(inner: str):
    """A function (M_prev, (C, U, q, resets)) -> (M_last, Y) over one chunk, rematerialised."""

    def sequential(M, xs):
        def step(M, x):
            c, u, qt, r = x
            M = _sequential_step(M, (c, u, r))
            return M, _read(M, qt)

        return jax.lax.scan(step, M, xs)

    def associative(M, xs):
        c, u, qt, r = xs
        M_all = _associative_from(M, c, u, r)
        return M_all[-1], _read(M_all, qt)

    return jax.checkpoint(sequential if inner == "sequential" else associative)


def _pad_split(chunk: int, *arrays):
    """Pad time to a multiple of `chunk` with identity steps (C = 1, U = 0, q = 0, no reset), which
    leave every earlier state and M_last unchanged, and split it into [n, chunk, ...]. `arrays`
    are (C, U, q, resets), each may be None."""
    T = arrays[0].shape[0]
    n = math.ceil(T / chunk)
    pad = n * chunk - T
    padded = []
    for a, fill in zip(arrays, (1, 0, 0, False), strict=True):
        if a is not None and pad:
            a = jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)])
        padded.append(None if a is None else a.reshape(n, chunk, *a.shape[1:]))
    return padded


def _chunked_read(C, U, q, resets, chunk: int, inner: str):
    T = C.shape[0]
    xs = _pad_split(chunk, C, U, q, resets)
    M_last, Y = jax.lax.scan(_chunk_read(inner), jnp.zeros_like(C[0]), xs)
    return Y.reshape(-1, *Y.shape[2:])[:T], M_last


def hadamard_scan(C, U, *, resets=None, memory=None, method: str = "auto"):
    """Every memory state of M_t = C_t ⊙ M_{t-1} + U_t.

    Args:
      C, U: [T, *batch, H, H] calibration and update matrices.
      resets: [T, *batch] bool, True where step t starts a new episode (M_t = U_t).
      memory: [*batch, H, H] memory carried in from the previous segment (zeros when None).
      method: "sequential" | "associative" | "chunked" | "auto" (module docstring).

    Returns:
      (M_all [T, *batch, H, H] with M_all[t] = M_t, M_last [*batch, H, H]).
    """
    _validate(C, U, None, resets, memory, method, None)
    U = fold_memory(C, U, resets, memory)
    T, H = C.shape[0], C.shape[-1]
    if method == "auto":
        method = choose_method(T, math.prod(C.shape[1:-2]), H)
    if method == "sequential":

        def step(M, x):
            M = _sequential_step(M, x)
            return M, M

        M_all = jax.lax.scan(step, jnp.zeros_like(C[0]), (C, U, resets))[1]
    elif method == "associative":
        M_all = affine_scan(C, U, resets)
    else:  # chunked: associative inside chunks, each chunk's last state carried sequentially.

        def body(M, xs):
            M_c = _associative_from(M, *xs)
            return M_c[-1], M_c

        Cs, Us, _, rs = _pad_split(min(DEFAULT_CHUNK, T), C, U, None, resets)
        M_all = jax.lax.scan(body, jnp.zeros_like(C[0]), (Cs, Us, rs))[1]
        M_all = M_all.reshape(-1, *C.shape[1:])[:T]
    return M_all, M_all[-1]


def hadamard_read(C, U, q, *, resets=None, memory=None, method: str = "auto", chunk_size=None):
    """Read-outs Y_t = M_t q_t of the Hadamard recurrence, without keeping every M_t.

    Args:
      C, U: [T, *batch, H, H]; q: [T, *batch, H] queries.
      resets, memory, method: as in `hadamard_scan`.
      chunk_size: steps per rematerialised chunk for "sequential" and "chunked" (default 64,
        capped at T). Only memory use and speed depend on it, never the numbers.

    Returns:
      (Y [T, *batch, H], M_last [*batch, H, H]).
    """
    _validate(C, U, q, resets, memory, method, chunk_size)
    U = fold_memory(C, U, resets, memory)
    T, H = C.shape[0], C.shape[-1]
    if method == "auto":
        method = choose_method(T, math.prod(C.shape[1:-2]), H)
    if method == "associative":
        M_all = affine_scan(C, U, resets)
        return _read(M_all, q), M_all[-1]
    chunk = min(chunk_size or DEFAULT_CHUNK, T)
    return _chunked_read(C, U, q, resets, chunk, inner=method)
