"""The SHM read as a compiled CPU kernel: `native_read`, with `kernel.fused_read`'s API and numbers.

`kernel.fused_read` runs the recurrence as `lax.scan`s, so each step's H×H memories of the whole
batch go through memory between XLA ops (about a dozen per step, forward and backward). Here the
same forward and hand-written backward (kernel.py's docstring) run in C++ (`native/shm_native.cc`)
as XLA FFI custom calls, one sequence at a time: its H×H memory stays in cache for all T steps,
and the sequences are shared out over XLA's CPU thread pool. Each sequence is computed whole by
one thread, so the results do not depend on the thread count.

The C++ is compiled with the system's C++ compiler (`$CXX`, else `c++`) on first use, against
the FFI headers that ship with jaxlib, and cached in `$SHM_JAX_CACHE` (default
`~/.cache/shm_jax`) under a hash of the source, jaxlib's version, the flags and the CPU, so it
is built once per machine. It is tuned for the host (`-march=native`). `available()` says
whether it built; `shm_jax.SHM(method="auto")` uses it on a CPU when it did and falls back to
`fused_read` when it did not (a warning gives the compiler's message once).

float32 computes tanh with the rational approximation XLA's CPU backend uses, and float64 with
std::tanh, so its numbers match `fused_read` to rounding (float32: a few ulps; float64: 1e-12).
It is a `jax.custom_vjp`: reverse mode, jit and vmap work, forward mode does not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("native") / "shm_native.cc"
FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp-simd",
    "-fno-trapping-math",
    "-std=c++17",
    "-shared",
    "-fPIC",
)


def default_chunk(H: int) -> int:
    """Steps per recomputed chunk of the backward: the chunk's M̃ and tanh, 2·chunk·H² numbers,
    fit in 256 KiB of cache (32 at H = 32, 4 at H = 128), between 4 and 32 steps."""
    return max(4, min(32, 2**15 // (H * H)))


_TARGETS = {
    ("fwd", np.dtype("float32")): "ShmForwardF32",
    ("fwd", np.dtype("float64")): "ShmForwardF64",
    ("bwd", np.dtype("float32")): "ShmBackwardF32",
    ("bwd", np.dtype("float64")): "ShmBackwardF64",
}


def _cpu_id() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SHM_JAX_CACHE") or pathlib.Path.home() / ".cache/shm_jax")


def _build() -> pathlib.Path:
    """Compile the kernel into the cache (once per source, jaxlib, flags and CPU); its path."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        "\n".join(
            [SOURCE.read_text(), jax.lib.__version__, compiler, " ".join(FLAGS), _cpu_id()]
        ).encode()
    ).hexdigest()[:16]
    out = _cache_dir() / f"shm_native-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename: concurrent processes (pytest -n) never load a
    # half-written library.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = pathlib.Path(tmp) / out.name
        cmd = [compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(tmp_so)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp_so, out)
    return out


@functools.cache
def _load() -> str | None:
    """Build, load and register the kernel once; None if that worked, else why not."""
    if os.environ.get("SHM_JAX_NATIVE", "1") == "0":
        return "disabled by SHM_JAX_NATIVE=0"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        for name in _TARGETS.values():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), "cpu")
    except (OSError, RuntimeError, AttributeError) as err:
        return str(err)
    return None


def available() -> bool:
    """Whether the native kernel is built and registered (it builds on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    """None when `available()`, else why the kernel could not be built or loaded."""
    return _load()


@functools.cache
def warn_fallback() -> None:
    """Once per process: say that "auto" on a CPU runs the slower `fused_read`, and why."""
    warnings.warn(
        "shm_jax: the native CPU kernel is unavailable, so SHM runs kernel.fused_read (same "
        f"numbers, about 2x slower to train): {unavailable_reason()}",
        RuntimeWarning,
        stacklevel=3,
    )


def _target(kind: str, dtype) -> str:
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"shm_jax native kernel unavailable: {reason}")
    try:
        return _TARGETS[kind, np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"native_read supports float32 and float64, got {dtype}") from None


def _call_forward(theta, c, e, k, q, r, M0, chunk: int, keep: bool):
    """Batch-major [..., T, H] inputs -> (Y, M_last, starts [..., ceil(T/chunk) or 0, H, H])."""
    T, H = theta.shape[-2:]
    batch = theta.shape[:-2]
    n_starts = math.ceil(T / min(chunk, T)) if keep else 0
    out = (
        jax.ShapeDtypeStruct(theta.shape, theta.dtype),
        jax.ShapeDtypeStruct(M0.shape, M0.dtype),
        jax.ShapeDtypeStruct((*batch, n_starts, H, H), theta.dtype),
    )
    call = jax.ffi.ffi_call(_target("fwd", theta.dtype), out, vmap_method="broadcast_all")
    return call(theta, c, e, k, q, r, M0, chunk=np.int64(chunk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _native(theta, c, e, k, q, r, M0, chunk):
    Y, M_last, _ = _call_forward(theta, c, e, k, q, r, M0, chunk, keep=False)
    return Y, M_last


def _native_fwd(theta, c, e, k, q, r, M0, chunk):
    Y, M_last, starts = _call_forward(theta, c, e, k, q, r, M0, chunk, keep=True)
    return (Y, M_last), (theta, c, e, k, q, r, starts)


def _native_bwd(chunk, residuals, cotangents):
    theta, c, e, k, q, r, starts = residuals
    dY, dM_last = cotangents
    vec = jax.ShapeDtypeStruct(theta.shape, theta.dtype)
    out = (vec,) * 5 + (jax.ShapeDtypeStruct(dM_last.shape, dM_last.dtype),)
    call = jax.ffi.ffi_call(_target("bwd", theta.dtype), out, vmap_method="broadcast_all")
    dtheta, dc, de, dk, dq, dM0 = call(
        theta, c, e, k, q, r, starts, dY, dM_last, chunk=np.int64(chunk)
    )
    return dtheta, dc, de, dk, dq, None, dM0


_native.defvjp(_native_fwd, _native_bwd)


def native_read(theta, c, eta_v, k, q, resets=None, memory=None, chunk: int | None = None):
    """Y_t = M_t q_t for M_t = (1 + tanh(θ_t c_tᵀ)) ⊙ M̃_{t-1} + (η_t v_t) k_tᵀ, in C++.

    Same arguments and results as `shm_jax.kernel.fused_read`: theta, c, eta_v, k, q
    [T, *batch, H]; resets [T, *batch] bool (None: none); memory [*batch, H, H] (None: zeros);
    `chunk` steps between the memories the forward keeps for the backward (None:
    `default_chunk(H)`; speed and memory only). Returns (Y [T, *batch, H], M_last [*batch, H, H]); gradients flow to every vector and
    `memory`. Raises RuntimeError if the kernel could not be built (`unavailable_reason()`)."""
    T, H = theta.shape[0], theta.shape[-1]
    chunk = default_chunk(H) if chunk is None else chunk
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    batch = theta.shape[1:-1]
    if resets is None:
        resets = jnp.zeros((T, *batch), bool)
    if memory is None:
        memory = jnp.zeros((*batch, H, H), theta.dtype)
    # The kernel takes the batch first and time second: [*batch, T, H].
    time_second = lambda a: jnp.moveaxis(a, 0, -2)
    vectors = [time_second(a) for a in (theta, c, eta_v, k, q)]
    r = jnp.moveaxis(resets.astype(bool), 0, -1)
    Y, M_last = _native(*vectors, r, memory, min(chunk, T))
    return jnp.moveaxis(Y, -2, 0), M_last
