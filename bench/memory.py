"""Throughput and peak memory of the Hadamard scans, the SHM layer and the GRU baseline.

    python bench/memory.py            # full table (a few minutes on 2 CPU cores)
    python bench/memory.py --quick    # fewer repeats
    python bench/memory.py --quick --size 128,64,32   # one size (repeatable flag)

For each (T, B, H) it reports sequence steps × batch per second (T·B / seconds) for the forward
pass and for forward+backward (grad of a fixed random weighting of the outputs), and the compiled program's peak
memory (arguments + outputs + temporaries, from XLA's memory analysis). Rows:
- `scan/<method>`: the bare `hadamard_read` on given C, U [T, B, H, H] and q [T, B, H];
- `read/<impl>`: SHM's read from the per-step vectors θ, c, η v, k, q [T, B, H] (C_t and U_t
  formed inside the step): `factored` = `shm.factored_read` differentiated by autodiff,
  `fused` = `kernel.fused_read` with its hand-written backward, `native` = `native.native_read`
  (the same in C++; CPU only, when it builds), `pallas` = `kernel.pallas_read` (GPU only: on a
  CPU it would run interpreted);
- `SHM(H)/<method>`: the whole SHM layer (projections, calibration, scan, read-out), input width H
  ("sequential" runs `fused_read`; "native" on CPU only, "pallas" on GPU only);
- `GRU(256)`, `GRU(256), unroll 16`: flax GRUCell with 256 hidden units under a scan (1 or 16
  steps per loop iteration), input width H, same T and B;
- `memorax SHM(H)`: memorax 1.0.1's `SHMCell` (the peer JAX SHM) under its own `RNN` wrapper,
  same sizes (input width H, H x H memory, H outputs, 128 θ rows drawn per step, a reset at
  T/2), batch-major as memorax takes it; run when `import memorax` works
  (`pip install -e '.[bench]'`), skipped with a note otherwise. The line after it is the ratio
  of our SHM's fwd+bwd steps/s ("auto" and the fastest method) to memorax's.
"""

import pathlib
import sys

# Run as `python bench/<name>.py`: put the repo root first on the path, not bench/ (whose envs.py
# and train.py would shadow the `envs` package and `train.py`).
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])


import argparse
import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import shm_jax
from shm_jax import native
from shm_jax.kernel import fused_read, pallas_read
from shm_jax.native import native_read
from shm_jax.scan import choose_method, hadamard_read
from shm_jax.shm import factored_read, layer_method

SIZES = [(128, 64, 32), (1024, 8, 128), (1024, 64, 32)]
METHODS = ["sequential", "associative", "chunked", "auto"]
READS = {
    "factored": factored_read,
    "fused": fused_read,
    "native": native_read,
    "pallas": pallas_read,
}


def timeit(fn, args, repeats: int) -> float:
    """Median wall time of fn(*args) in seconds, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_mib(compiled) -> float:
    stats = compiled.memory_analysis()
    if stats is None:
        return float("nan")
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return total / 2**20


def measure(forward, args, repeats, outputs=False):
    """(fwd steps/s, fwd+bwd steps/s, fwd+bwd peak MiB) of forward(*args) -> array [T, B, ...];
    with outputs=True also (forward's output, the gradients of the loss). The loss is a fixed
    random weighting of the output, sum(w ⊙ y), as a real loss would give: a plain sum would hand
    every step the same constant cotangent, which XLA can simplify in ways a real loss does not
    allow (the read's backward measured 1.5x faster that way). Each program is compiled once,
    ahead of time."""
    fwd = jax.jit(forward).lower(*args).compile()
    out = jax.eval_shape(forward, *args)
    w = jax.random.normal(jax.random.PRNGKey(1), out.shape, out.dtype)
    loss = lambda *a: jnp.sum(forward(*a) * w)
    bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).lower(*args).compile()
    result = timeit(fwd, args, repeats), timeit(bwd, args, repeats), peak_mib(bwd)
    return (result, (fwd(*args), bwd(*args))) if outputs else result


def scan_row(T, B, H, method, key):
    kc, ku, kq = jax.random.split(key, 3)
    C = 1 + jnp.tanh(jax.random.normal(kc, (T, B, H, H)))
    U = 0.1 * jax.random.normal(ku, (T, B, H, H))
    q = jax.random.normal(kq, (T, B, H))
    return measure(lambda C, U, q: hadamard_read(C, U, q, method=method)[0], (C, U, q), REPEATS)


def read_row(T, B, H, impl, key):
    kv, kc = jax.random.split(key)
    theta, c, eta_v, k, q = 0.5 * jax.random.normal(kv, (5, T, B, H))
    resets = jnp.zeros((T, B), bool).at[T // 2].set(True)
    memory = jnp.zeros((B, H, H))

    def forward(theta, c, eta_v, k, q):
        return READS[impl](theta, c, eta_v, k, q, resets, memory)[0]

    return measure(forward, (theta, c, eta_v, k, q), REPEATS)


def layer_row(name, T, B, H, key, **kwargs):
    module = shm_jax.make_memory(name, **kwargs)
    kx, kp, ka = jax.random.split(key, 3)
    x = jax.random.normal(kx, (T, B, H))
    resets = jnp.zeros((T, B), bool).at[T // 2].set(True)
    aux = module.sample_aux(ka, (T, B))
    carry = module.initialize_carry((B,))
    params = module.init(kp, carry, x, resets, aux)

    def forward(params, x):
        return module.apply(params, carry, x, resets, aux)[1]

    return measure(forward, (params, x), REPEATS)


PALLAS_SWEEP = {  # (block_b, block_rows, chunk, num_warps, prefetch) tried by --pallas-sweep
    "small_batch": [(1, 8, 8, 2, False), (1, 8, 8, 2, True), (1, 8, 16, 2, True),
                    (1, 16, 8, 4, False), (1, 16, 8, 4, True), (1, 8, 4, 2, True)],
    "large_batch": [(1, 32, 8, 4, False), (1, 32, 8, 4, True), (1, 32, 16, 4, True),
                    (1, 32, 8, 2, True), (1, 16, 8, 2, True)],
}  # fmt: skip


def pallas_sweep(sizes, key) -> None:
    """fwd and fwd+bwd steps/s of `pallas_read` per kernel config, and its largest relative
    difference from `fused_read` (values and gradients, float32), beside read/fused."""
    print("| T, B, H | block_b, block_rows, chunk, warps, prefetch | fwd steps/s | fwd+bwd steps/s "
          "| fwd+bwd peak MiB | max rel diff vs fused |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|")
    for T, B, H in sizes:
        vectors = tuple(0.5 * jax.random.normal(key, (5, T, B, H)))
        resets = jnp.zeros((T, B), bool).at[T // 2].set(True)
        _, ref = measure(lambda *v: fused_read(*v, resets)[0], vectors, 1, outputs=True)
        configs = PALLAS_SWEEP["small_batch" if B < 64 else "large_batch"]
        for bB, bR, chunk, warps, prefetch in configs:
            read = functools.partial(
                pallas_read,
                block_b=bB,
                block_rows=bR,
                chunk=chunk,
                num_warps=warps,
                prefetch=prefetch,
            )
            what = f"{bB}, {bR}, {chunk}, {warps}, {'yes' if prefetch else 'no'}"
            try:
                (fwd, bwd, peak), got = measure(
                    lambda *v, read=read: read(*v, resets)[0], vectors, REPEATS, outputs=True
                )
                diff = max(
                    float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
                )
                print(f"| {T}, {B}, {H} | {what} | {T * B / fwd:,.0f} "
                      f"| {T * B / bwd:,.0f} | {peak:,.0f} | {diff:.1e} |", flush=True)  # fmt: skip
            except Exception as err:  # a config the compiler rejects (e.g. out of registers)
                msg = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
                print(f"| {T}, {B}, {H} | {what} | failed: {msg} | | | |")


def memorax_row(T, B, H, key):
    """memorax's SHMCell under memorax's RNN (a flax scan that resets by masking the carry):
    inputs [B, T, H], mask [B, T]; the "memory" rng draws a θ row per step and sequence."""
    from memorax.networks.sequence_models import RNN, SHMCell

    module = RNN(
        cell=SHMCell(features=H, output_features=H, num_thetas=128),
        split_rngs={"params": False, "memory": True},
    )
    kx, kp, km = jax.random.split(key, 3)
    x = jax.random.normal(kx, (B, T, H))
    mask = jnp.zeros((B, T), bool).at[:, T // 2].set(True)
    params = module.init({"params": kp, "memory": km}, x, mask)

    def forward(params, x):
        return module.apply(params, x, mask, rngs={"memory": km})[1]

    return measure(forward, (params, x), REPEATS)


def memorax_version() -> tuple[str | None, str]:
    """(memorax's version, or None if it does not import; what to print about it)."""
    try:
        from importlib.metadata import version

        import memorax  # noqa: F401
    except Exception as err:  # not installed, or broken beside this jax
        why = "not installed" if isinstance(err, ImportError) else f"{type(err).__name__}: {err}"
        return None, f"{why}; its SHM row is skipped (pip install -e '.[bench]')"
    return version("memorax"), version("memorax")


def main():
    global REPEATS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    parser.add_argument(
        "--pallas-sweep",
        action="store_true",
        help="only time the Pallas kernel's configs against fused_read (GPU)",
    )
    parser.add_argument(
        "--size", action="append", metavar="T,B,H", help=f"size(s) to run (default {SIZES})"
    )
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split(",")) for size in args.size or []] or SIZES
    REPEATS = 2 if args.quick else 5

    peer, note = memorax_version()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), memorax {note}"
    )
    print()
    key = jax.random.PRNGKey(0)
    if args.pallas_sweep:
        pallas_sweep(sizes, key)
        return
    print("| T, B, H | what | fwd steps/s | fwd+bwd steps/s | fwd+bwd peak MiB |")
    print("|---|---|---:|---:|---:|")
    gpu = jax.default_backend() == "gpu"
    # The kernels for the backend: Pallas on a GPU, the C++ kernel on a CPU (when it builds).
    kernels = ["pallas"] if gpu else ["native"] if native.available() else []
    if jax.default_backend() == "cpu" and not kernels:
        print(f"(no native rows: {native.unavailable_reason()})\n")
    for T, B, H in sizes:
        auto = {
            "scan/auto": choose_method(T, B, H),
            f"SHM({H})/auto": layer_method(T, B, H, fused=True),
        }
        rows = []
        for method in METHODS:
            rows.append((f"scan/{method}", scan_row(T, B, H, method, key)))
        for impl in ["factored", "fused", *kernels]:
            rows.append((f"read/{impl}", read_row(T, B, H, impl, key)))
        for method in METHODS + kernels:
            rows.append(
                (f"SHM({H})/{method}", layer_row("shm", T, B, H, key, size=H, method=method))
            )
        rows.append(("GRU(256)", layer_row("gru", T, B, H, key, size=256)))
        rows.append(("GRU(256), unroll 16", layer_row("gru", T, B, H, key, size=256, unroll=16)))
        if peer:
            rows.append((f"memorax SHM({H})", memorax_row(T, B, H, key)))
        for what, (fwd, bwd, peak) in rows:
            label = f"{what} (= {auto[what]})" if what in auto else what
            print(
                f"| {T}, {B}, {H} | {label} | {T * B / fwd:,.0f} | {T * B / bwd:,.0f} "
                f"| {peak:,.0f} |",
                flush=True,
            )
        for kind in ("scan", f"SHM({H})"):
            fastest = min(bwd for w, (_, bwd, _) in rows if w.startswith(kind + "/"))
            auto_bwd = dict(rows)[f"{kind}/auto"][1]
            print(
                f"|  | {kind}: auto vs fastest fwd+bwd | | {fastest / auto_bwd:.2f}x of fastest | |"
            )
        shm_best = min(bwd for w, (_, bwd, _) in rows if w.startswith(f"SHM({H})/"))
        print(
            f"|  | SHM({H}) best vs GRU(256) fwd+bwd | | {dict(rows)['GRU(256)'][1] / shm_best:.2f}x | |"
        )
        if peer:
            theirs = dict(rows)[f"memorax SHM({H})"][1]
            ours = dict(rows)[f"SHM({H})/auto"][1]
            print(
                f"|  | SHM({H}) vs memorax SHM({H}) fwd+bwd | | auto {theirs / ours:.2f}x, "
                f"best {theirs / shm_best:.2f}x | |"
            )


REPEATS = 5

if __name__ == "__main__":
    main()
