"""The Hadamard recurrence M_t = C_t ⊙ M_{t-1} + U_t as pure functions (time-major).

Three forms give the same numbers (Le et al. 2025, Sec. 3; `shared/spec/shm.md`):

- "sequential": one `lax.scan` step per time step. Least work; fastest on a CPU.
- "associative": `lax.associative_scan` over the pairs (C_t, U_t) with the operator
  (A1, B1) ∘ (A2, B2) = (A1 ⊙ A2, A2 ⊙ B1 + B2): O(log T) depth, but it materialises every M_t
  (T·B·H² numbers) several times. Pays off on a GPU/TPU.
- "chunked": sequential across chunks of `chunk_size` steps, associative inside a chunk, the
  read-out M_t q_t taken inside so no full M_t leaves its chunk.

Episode starts: `resets[t]` True means the memory restarts from zero before step t's write, so
M_t = U_t. It is folded in by zeroing C_t (exact, since the recurrence is linear in M). A memory
carried in from the previous segment is folded into the first write: U_0 += C_0 ⊙ M_prev.

Training memory: `hadamard_read` with "sequential" or "chunked" wraps every chunk in
`jax.checkpoint`, so the backward pass keeps only the H×H memory at chunk boundaries and
recomputes each chunk's states, instead of storing every M_t (T·B·H² floats).

"auto" picks by backend and size (rule measured with `bench/memory.py`, see README):
on CPU always "sequential" (it was the fastest method at every size we measured, 2-9x ahead
of "associative"); on GPU/TPU "associative" while one copy of all M_t is small
(T·B·H² ≤ 2**24 elements), else "chunked" with chunks of 64 steps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

METHODS = ("auto", "sequential", "associative", "chunked")
DEFAULT_CHUNK = 64
_ASSOCIATIVE_MAX_ELEMENTS = 2**24


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
    return "associative" if T * batch * H * H <= _ASSOCIATIVE_MAX_ELEMENTS else "chunked"


def _fold(C, U, resets, memory):
    """Fold resets and the carried memory into (C, U) so the scan starts from M = 0."""
    if resets is not None:
        C = C * (1 - resets.astype(C.dtype))[..., None, None]
    if memory is not None:
        U = U.at[0].add(C[0] * memory)
    return C, U


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _associative(C, U):
    """Every M_t from zero initial memory: [T, *batch, H, H]."""
    return jax.lax.associative_scan(_combine, (C, U), axis=0)[1]


def _associative_from(M, c, u):
    """Every state of one chunk [t, *batch, H, H], starting from the carried memory M."""
    return _associative(c, u.at[0].add(c[0] * M))


def _read(M, q):
    return jnp.einsum("...ij,...j->...i", M, q)


def _chunk_read(inner: str):
    """A function (M_prev, (C, U, q)) -> (M_last, Y) over one chunk, rematerialised."""

    def sequential(M, xs):
        def step(M, x):
            c, u, qt = x
            M = c * M + u
            return M, _read(M, qt)

        return jax.lax.scan(step, M, xs)

    def associative(M, xs):
        c, u, qt = xs
        M_all = _associative_from(M, c, u)
        return M_all[-1], _read(M_all, qt)

    return jax.checkpoint(sequential if inner == "sequential" else associative)


def _pad_split(C, U, q, chunk: int):
    """Pad time to a multiple of `chunk` with identity steps (C = 1, U = 0, q = 0), which leave
    every earlier state and M_last unchanged, and split it into [n, chunk, ...]."""
    T = C.shape[0]
    n = math.ceil(T / chunk)
    pad = n * chunk - T
    padded = []
    for a, fill in ((C, 1), (U, 0), (q, 0)):
        if a is not None and pad:
            a = jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)])
        padded.append(None if a is None else a.reshape(n, chunk, *a.shape[1:]))
    return padded


def _chunked_read(C, U, q, chunk: int, inner: str):
    T = C.shape[0]
    Cs, Us, qs = _pad_split(C, U, q, chunk)
    M_last, Y = jax.lax.scan(_chunk_read(inner), jnp.zeros_like(C[0]), (Cs, Us, qs))
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
    C, U = _fold(C, U, resets, memory)
    T, H = C.shape[0], C.shape[-1]
    if method == "auto":
        method = choose_method(T, math.prod(C.shape[1:-2]), H)
    if method == "sequential":

        def step(M, x):
            M = x[0] * M + x[1]
            return M, M

        M_all = jax.lax.scan(step, jnp.zeros_like(C[0]), (C, U))[1]
    elif method == "associative":
        M_all = _associative(C, U)
    else:  # chunked: associative inside chunks, each chunk's last state carried sequentially.

        def body(M, xs):
            M_c = _associative_from(M, *xs)
            return M_c[-1], M_c

        Cs, Us, _ = _pad_split(C, U, None, min(DEFAULT_CHUNK, T))
        M_all = jax.lax.scan(body, jnp.zeros_like(C[0]), (Cs, Us))[1]
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
    C, U = _fold(C, U, resets, memory)
    T, H = C.shape[0], C.shape[-1]
    if method == "auto":
        method = choose_method(T, math.prod(C.shape[1:-2]), H)
    if method == "associative":
        M_all = _associative(C, U)
        return _read(M_all, q), M_all[-1]
    chunk = min(chunk_size or DEFAULT_CHUNK, T)
    return _chunked_read(C, U, q, chunk, inner=method)
