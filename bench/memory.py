"""Throughput and peak memory of the Hadamard scans, the SHM layer and every registered memory.

    python bench/memory.py            # full table (a few minutes on 2 CPU cores)
    python bench/memory.py --quick    # fewer repeats
    python bench/memory.py --quick --size 128,64,32   # one size (repeatable flag)
    python bench/memory.py --memories shm gru --parts memories   # only those memories' rows
    python bench/memory.py --parts layer --methods auto pallas   # only those SHM methods
    python bench/memory.py --pallas-sweep --quick --csv sweep.csv # the Pallas kernel's configs

For each (T, B, H) it reports sequence steps × batch per second (T·B / seconds) for the forward
pass and for forward+backward (grad of a fixed random weighting of the outputs), and the
compiled program's peak memory (arguments + outputs + temporaries, from XLA's memory analysis;
"n/a" where the backend does not report it). Rows, by `--parts`:
- scan: `scan/<method>`, the bare `hadamard_read` on given C, U [T, B, H, H] and q [T, B, H];
- read: SHM's read from the per-step vectors θ, c, η v, k, q [T, B, H] (C_t and U_t formed
  inside the step): `factored` = `shm.factored_read` differentiated by autodiff, `fused` =
  `kernel.fused_read` with its hand-written backward, `native` = `native.native_read` (the same
  in C++; CPU only, when it builds), `pallas` and `pallas_pipelined` = `kernel.pallas_read`
  (GPU only: on a CPU they would run interpreted);
- layer: `SHM(H)/<method>`, the whole SHM layer (projections, calibration, scan, read-out),
  input width H ("sequential" runs `fused_read`; "native" on CPU only, the Pallas methods on
  GPU only; `--methods` picks some);
- memories: `<name>(H)`, every memory of `shm_jax.memory_names` (or `--memories`) at size H and
  input width H, with its defaults (e.g. the GRU's unroll by backend); a memory that fails at a
  size gets a `failed` row;
- peer: `memorax SHM(H)`, memorax 1.0.1's `SHMCell` (the peer JAX SHM) under its own `RNN`
  wrapper, same sizes (input width H, H x H memory, H outputs, 128 θ rows drawn per step, a
  reset at T/2), batch-major as memorax takes it; run when `import memorax` works (`pip install
  -e '.[bench]'`), skipped with a note otherwise. The line after it is the ratio of our SHM's
  fwd+bwd steps/s ("auto" and the fastest method) to memorax's.

Rows go round-robin over the sizes (each size's first row, then each size's second, ...), so a
run cut short still covers every size; the ratio lines come at the end.

`--pallas-sweep` instead times `pallas_read` per kernel configuration (`sweep_configs`: the
default of `kernel.pallas_blocks` first, then its neighbours in chunk, rows, warps, and the way a
chunk's data moves) beside `fused_read`, round-robin over the sizes so that a run cut short
still covers each size's first configs. `--csv PATH` writes every row as it is measured.
"""

import pathlib
import sys

# Run as `python bench/<name>.py`: put the repo root first on the path, not bench/ (whose envs.py
# and train.py would shadow the `envs` package and `train.py`).
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])


import argparse
import csv
import functools
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import shm_jax
from shm_jax import native
from shm_jax.kernel import IO_MODES, fused_read, pallas_blocks, pallas_read
from shm_jax.native import native_read
from shm_jax.scan import choose_method, hadamard_read
from shm_jax.shm import LAYER_METHODS, factored_read, layer_method

SIZES = [(128, 64, 32), (1024, 8, 128), (1024, 64, 32)]
SWEEP_SIZES = [(1024, 8, 128), (1024, 64, 128), (1024, 512, 32)]
METHODS = ["sequential", "associative", "chunked", "auto"]
PARTS = ["scan", "read", "layer", "memories", "peer"]
READS = {
    "factored": factored_read,
    "fused": fused_read,
    "native": native_read,
    "pallas": pallas_read,
    "pallas_pipelined": functools.partial(pallas_read, pipelined=True),
}
REPEATS = 5


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
    """Arguments + outputs + temporaries of a compiled program in MiB (NaN if not reported)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # a backend without memory analysis
        return float("nan")
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


def memorax_version() -> tuple[bool, str]:
    """(whether memorax imports, what to print about it). A memorax that imports but has no
    package metadata (e.g. put on the path by hand) reports "unknown version"."""
    try:
        import memorax  # noqa: F401
    except Exception as err:  # not installed, or broken beside this jax
        why = "not installed" if isinstance(err, ImportError) else f"{type(err).__name__}: {err}"
        return False, f"{why}; its SHM row is skipped (pip install -e '.[bench]')"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return True, version("memorax")
    except PackageNotFoundError:
        return True, "unknown version"


class Rows:
    """Prints table rows as markdown and, with a csv path, appends them there as they come
    (flushed, so a run cut short keeps what it measured)."""

    def __init__(self, columns: list[str], csv_path: str | None):
        self.columns = columns
        self.file = None
        if csv_path:
            os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
            self.file = open(csv_path, "w", newline="")
            self.writer = csv.writer(self.file)
            self.writer.writerow(columns)
            self.file.flush()

    def add(self, markdown: str, values: dict) -> None:
        print(markdown, flush=True)
        if self.file is not None:
            self.writer.writerow([values.get(c, "") for c in self.columns])
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def fmt_peak(peak: float) -> str:
    return "n/a" if math.isnan(peak) else f"{peak:,.0f}"


def short_error(err: Exception) -> str:
    return str(err).splitlines()[0][:120] if str(err) else type(err).__name__


# --- The Pallas sweep ---------------------------------------------------------------------------


def sweep_configs(B: int, H: int) -> list[tuple[int, int, int, int, str]]:
    """(block_b, block_rows, chunk, num_warps, io) to time at B sequences of H×H memories, most
    telling first: `pallas_blocks`' default, the former default (chunk 8, loads at their use),
    the default pipelined, then its neighbours in chunk (2, 4, 8, 16), way of moving data, rows
    (half, double), warps (half, double) and two sequences per program. No duplicates."""
    d = pallas_blocks(B, H)
    Hp = 1 << (H - 1).bit_length()
    io = "prefetch" if d.prefetch else "step"
    warps_for = lambda rows: 2 if rows * Hp <= 1024 else 4
    base = (d.block_b, d.block_rows, d.chunk, d.num_warps, io)
    with_ = lambda **kw: tuple(
        kw.get(name, value)
        for name, value in zip(("bB", "rows", "chunk", "warps", "io"), base, strict=True)
    )
    configs = [base, with_(chunk=8, io="step"), with_(io="pipelined")]
    configs += [with_(chunk=ch, io=m) for ch in (2, 8) for m in ("prefetch", "pipelined")]
    configs += [with_(io=m) for m in IO_MODES]
    for rows in (d.block_rows // 2, d.block_rows * 2):
        if 4 <= rows <= Hp:
            configs += [with_(rows=rows, warps=warps_for(rows), io=m) for m in (io, "pipelined")]
    configs += [with_(warps=w) for w in (d.num_warps // 2, d.num_warps * 2) if w >= 1]
    configs += [with_(chunk=16, io=m) for m in ("prefetch", "pipelined")]
    configs += [with_(chunk=4, io=m) for m in ("step", "prefetch", "pipelined")]
    if B >= 2:
        configs.append(with_(bB=2))
    return list(dict.fromkeys(configs))


SWEEP_COLUMNS = ["T", "B", "H", "block_b", "block_rows", "chunk", "num_warps", "io", "default"]
SWEEP_COLUMNS += ["fwd_steps_per_s", "fwd_bwd_steps_per_s", "peak_mib", "max_rel_diff", "error"]


def pallas_sweep(sizes, key, csv_path=None, max_configs=None) -> None:
    """fwd and fwd+bwd steps/s of `pallas_read` per kernel config (`sweep_configs`, at most
    `max_configs` per size), and its largest relative difference from `fused_read` (values and
    gradients, float32). Round-robin over the sizes: every size's first config, then every
    size's second, and so on."""
    rows = Rows(SWEEP_COLUMNS, csv_path)
    print("| T, B, H | block_b, block_rows, chunk, warps, io | fwd steps/s | fwd+bwd steps/s "
          "| fwd+bwd peak MiB | max rel diff vs fused |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|")
    cases = []
    for T, B, H in sizes:
        vectors = tuple(0.5 * jax.random.normal(key, (5, T, B, H)))
        resets = jnp.zeros((T, B), bool).at[T // 2].set(True)
        _, ref = measure(lambda *v, r=resets: fused_read(*v, r)[0], vectors, 1, outputs=True)
        configs = sweep_configs(B, H)[:max_configs]
        cases.append(((T, B, H), vectors, resets, ref, configs))
    for rank in range(max(len(case[-1]) for case in cases)):
        for (T, B, H), vectors, resets, ref, configs in cases:
            if rank >= len(configs):
                continue
            bB, bR, chunk, warps, io = configs[rank]
            read = functools.partial(
                pallas_read,
                block_b=bB,
                block_rows=bR,
                chunk=chunk,
                num_warps=warps,
                prefetch=io == "prefetch",
                pipelined=io == "pipelined",
            )
            what = f"{bB}, {bR}, {chunk}, {warps}, {io}" + (" (default)" if rank == 0 else "")
            values = dict(T=T, B=B, H=H, block_b=bB, block_rows=bR, chunk=chunk, num_warps=warps)
            values.update(io=io, default=int(rank == 0))
            try:
                (fwd, bwd, peak), got = measure(
                    lambda *v, read=read, r=resets: read(*v, r)[0], vectors, REPEATS, outputs=True
                )
                diff = max(
                    float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
                )
                values.update(
                    fwd_steps_per_s=round(T * B / fwd),
                    fwd_bwd_steps_per_s=round(T * B / bwd),
                    peak_mib=round(peak, 1),
                    max_rel_diff=f"{diff:.2e}",
                )
                rows.add(f"| {T}, {B}, {H} | {what} | {T * B / fwd:,.0f} | {T * B / bwd:,.0f} "
                         f"| {fmt_peak(peak)} | {diff:.1e} |", values)  # fmt: skip
            except Exception as err:  # a config the compiler rejects (e.g. out of registers)
                values.update(error=short_error(err))
                rows.add(f"| {T}, {B}, {H} | {what} | failed: {short_error(err)} | | | |", values)
    rows.close()


# --- The table ----------------------------------------------------------------------------------


def table(sizes, key, parts, memories, methods=None, csv_path=None) -> None:
    """The rows of the module docstring, round-robin over the sizes (every size's first row,
    then every size's second, ...: a run cut short still covers each size), then the ratio
    lines per size. `methods`: the SHM layer's methods to time (default: all that run here)."""
    rows = Rows(["T", "B", "H", "what", "fwd_steps_per_s", "fwd_bwd_steps_per_s", "peak_mib"],
                csv_path)  # fmt: skip
    print("| T, B, H | what | fwd steps/s | fwd+bwd steps/s | fwd+bwd peak MiB |")
    print("|---|---|---:|---:|---:|")
    gpu = jax.default_backend() == "gpu"
    peer, _ = memorax_version()
    # The kernels for the backend: Pallas on a GPU, the C++ kernel on a CPU (when it builds).
    kernels = ["pallas", "pallas_pipelined"] if gpu else ["native"] if native.available() else []
    cases = []
    for T, B, H in sizes:
        jobs = []
        if "scan" in parts:
            jobs += [(f"scan/{m}", functools.partial(scan_row, T, B, H, m)) for m in METHODS]
        if "read" in parts:
            for impl in ["factored", "fused", *kernels]:
                jobs.append((f"read/{impl}", functools.partial(read_row, T, B, H, impl)))
        if "layer" in parts:
            for method in [m for m in METHODS + kernels if methods is None or m in methods]:
                run = functools.partial(layer_row, "shm", T, B, H, size=H, method=method)
                jobs.append((f"SHM({H})/{method}", run))
        if "memories" in parts:
            for name in memories:
                jobs.append((f"{name}({H})", functools.partial(layer_row, name, T, B, H, size=H)))
        if "peer" in parts and peer:
            jobs.append((f"memorax SHM({H})", functools.partial(memorax_row, T, B, H)))
        cases.append(((T, B, H), jobs, {}))
    for rank in range(max((len(jobs) for _, jobs, _ in cases), default=0)):
        for (T, B, H), jobs, done in cases:
            if rank >= len(jobs):
                continue
            what, job = jobs[rank]
            auto = {
                "scan/auto": choose_method(T, B, H),
                f"SHM({H})/auto": layer_method(T, B, H, fused=True),
            }
            label = f"{what} (= {auto[what]})" if what in auto else what
            values = dict(T=T, B=B, H=H, what=label)
            try:
                fwd, bwd, peak = job(key)
            except Exception as err:  # e.g. a memory that does not take this size
                rows.add(f"| {T}, {B}, {H} | {label} | failed: {short_error(err)} | | |", values)
                continue
            done[what] = (fwd, bwd, peak)
            values.update(
                fwd_steps_per_s=round(T * B / fwd),
                fwd_bwd_steps_per_s=round(T * B / bwd),
                peak_mib=round(peak, 1),
            )
            rows.add(f"| {T}, {B}, {H} | {label} | {T * B / fwd:,.0f} | {T * B / bwd:,.0f} "
                     f"| {fmt_peak(peak)} |", values)  # fmt: skip
    for size, _, done in cases:
        ratio_lines(done, *size)
    rows.close()


def ratio_lines(done: dict, T: int, B: int, H: int) -> None:
    """auto against the fastest form, and SHM against the GRU and memorax, where measured."""
    at = f"| {T}, {B}, {H} |"
    for kind in ("scan", f"SHM({H})"):
        times = [bwd for w, (_, bwd, _) in done.items() if w.startswith(kind + "/")]
        if times and f"{kind}/auto" in done:
            ratio = min(times) / done[f"{kind}/auto"][1]
            print(f"{at} {kind}: auto vs fastest fwd+bwd | | {ratio:.2f}x of fastest | |")
    shm = [bwd for w, (_, bwd, _) in done.items() if w.startswith(f"SHM({H})/")]
    if shm and f"gru({H})" in done:
        ratio = done[f"gru({H})"][1] / min(shm)
        print(f"{at} SHM({H}) best vs gru({H}) fwd+bwd | | {ratio:.2f}x | |")
    if shm and f"memorax SHM({H})" in done and f"SHM({H})/auto" in done:
        theirs, ours = done[f"memorax SHM({H})"][1], done[f"SHM({H})/auto"][1]
        print(f"{at} SHM({H}) vs memorax SHM({H}) fwd+bwd | | auto {theirs / ours:.2f}x, "
              f"best {theirs / min(shm):.2f}x | |")  # fmt: skip


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        T, B, H = (int(n) for n in text.split(","))
        if min(T, B, H) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: write T,B,H with three positive ints, e.g. 1024,8,128"
        ) from None
    return T, B, H


def main(argv=None):
    global REPEATS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    parser.add_argument(
        "--pallas-sweep",
        action="store_true",
        help="only time the Pallas kernel's configs against fused_read (GPU)",
    )
    parser.add_argument("--sweep-max", type=int, default=None, help="sweep: configs per size")
    parser.add_argument(
        "--size",
        action="append",
        type=parse_size,
        metavar="T,B,H",
        help=f"size(s) to run (default {SIZES}; the sweep's {SWEEP_SIZES})",
    )
    parser.add_argument(
        "--memories",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the memories part's rows (default: all of shm_jax.memory_names)",
    )
    parser.add_argument(
        "--parts", nargs="+", default=PARTS, choices=PARTS, help="which rows (default: all)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="the layer part's SHM methods (default: every one that runs on this backend)",
    )
    parser.add_argument("--csv", default=None, metavar="PATH", help="also write the rows here")
    args = parser.parse_args(argv)
    memories = args.memories or list(shm_jax.memory_names)
    unknown = [m for m in memories if m not in shm_jax.memory_names]
    if unknown:
        parser.error(
            f"unknown memory {unknown[0]!r} in --memories; choose from "
            f"{', '.join(shm_jax.memory_names)}"
        )
    if args.methods and set(args.methods) - set(LAYER_METHODS):
        parser.error(
            f"unknown method {sorted(set(args.methods) - set(LAYER_METHODS))[0]!r} in --methods; "
            f"choose from {', '.join(LAYER_METHODS)}"
        )
    if args.sweep_max is not None and args.sweep_max < 1:
        parser.error(f"--sweep-max must be >= 1; got {args.sweep_max}")
    REPEATS = 2 if args.quick else 5

    _, note = memorax_version()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, device "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), memorax {note}"
    )
    print()
    key = jax.random.PRNGKey(0)
    if args.pallas_sweep:
        pallas_sweep(args.size or SWEEP_SIZES, key, args.csv, args.sweep_max)
        return
    if jax.default_backend() == "cpu" and not native.available() and "read" in args.parts:
        print(f"(no native rows: {native.unavailable_reason()})\n")
    table(args.size or SIZES, key, args.parts, memories, args.methods, args.csv)


if __name__ == "__main__":
    main()
