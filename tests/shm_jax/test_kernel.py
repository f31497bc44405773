"""`fused_read` (hand-written backward), `native_read` (the same in C++, an XLA FFI call) and
`pallas_read` (Pallas kernels, interpreted on CPU; every way of moving a chunk's data, the
pipelined one included) against a float64 numpy loop for values, against autodiff of independent
float64 scans and central finite differences for gradients; and the Pallas kernels lowered for a
GPU (Triton), which a CPU can do without running them."""

import functools
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shm_jax import native
from shm_jax.kernel import (
    PALLAS_MIN_PROGRAMS,
    PallasConfig,
    fused_read,
    pallas_blocks,
    pallas_read,
)
from shm_jax.native import native_read
from shm_jax.shm import factored_read

NAMES = ("theta", "c", "eta_v", "k", "q")
ON_CPU = pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="native_read is the CPU kernel: its XLA FFI handlers are registered for the CPU only",
)
NATIVE = pytest.param(native_read, id="native", marks=ON_CPU)
# The forms with a hand-written backward that run natively on this backend.
READS = pytest.mark.parametrize("read", [pytest.param(fused_read, id="fused"), NATIVE])


def test_native_kernel_builds_where_there_is_a_compiler():
    """The native tests below must not pass vacuously: wherever a C++ compiler is installed (as
    on CI), the kernel builds and registers."""
    if shutil.which("c++") or shutil.which("g++"):
        assert native.available(), native.unavailable_reason()


def numpy_read(theta, c, e, k, q, resets, memory):
    """Plain float64 loop: M_t = (1 + tanh(θ_t c_tᵀ)) ⊙ M̃_{t-1} + e_t k_tᵀ, Y_t = M_t q_t."""
    M = memory.astype(np.float64).copy()
    Ys = []
    for t in range(theta.shape[0]):
        M = np.where(resets[t][..., None, None], 0.0, M)
        C = 1 + np.tanh(theta[t][..., :, None] * c[t][..., None, :])
        M = C * M + e[t][..., :, None] * k[t][..., None, :]
        Ys.append(np.einsum("...ij,...j->...i", M, q[t]))
    return np.stack(Ys), M


def dense_scan_read(theta, c, e, k, q, resets, memory):
    """Reference for autodiff: C_t, U_t materialised [T, *batch, H, H], one lax.scan step each."""
    C = 1 + jnp.tanh(theta[..., :, None] * c[..., None, :])
    U = e[..., :, None] * k[..., None, :]

    def step(M, x):
        Ct, Ut, qt, r = x
        M = Ct * jnp.where(r[..., None, None], 0.0, M) + Ut
        return M, jnp.einsum("...ij,...j->...i", M, qt)

    M_last, Y = jax.lax.scan(step, memory, (C, U, q, resets))
    return Y, M_last


def random_case(seed, T=None):
    rng = np.random.default_rng(seed)
    T = T or int(rng.integers(1, 40))
    batch = tuple(int(b) for b in rng.integers(1, 4, size=rng.integers(0, 3)))
    H = int(rng.integers(1, 6))
    vectors = [rng.normal(size=(T, *batch, H)) for _ in NAMES]
    resets = rng.random((T, *batch)) < 0.2
    memory = rng.normal(size=(*batch, H, H))
    # cotangents: a random linear functional of every read-out and of the last memory
    wY, wM = rng.normal(size=(T, *batch, H)), rng.normal(size=(*batch, H, H))
    return vectors, resets, memory, wY, wM


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b), initial=0.0) / (np.max(np.abs(b), initial=0.0) + 1e-300))


def loss_fn(read, resets, wY, wM, chunk):
    def loss(*args):  # args: the 5 vectors and the memory
        Y, M_last = read(*args[:5], resets, args[5], chunk=chunk)
        return jnp.sum(Y * wY) + jnp.sum(M_last * wM)

    return loss


@functools.cache
def float64_references(seed, chunk):
    """One random case (`random_case(seed)`) and its float64 references: the numpy loop's
    (Y, M_last), and the gradients of autodiff through the dense scan and `factored_read`."""
    vectors, resets, memory, wY, wM = random_case(seed)
    ref_Y, ref_M = numpy_read(*vectors, resets, memory)
    with jax.enable_x64(True):
        args = [jnp.asarray(a) for a in (*vectors, memory)]
        r, wYj, wMj = jnp.asarray(resets), jnp.asarray(wY), jnp.asarray(wM)
        grad = lambda read: jax.grad(loss_fn(read, r, wYj, wMj, chunk), tuple(range(6)))

        @jax.jit  # one compile for both references
        def run(*args):
            return grad(lambda *a, chunk: dense_scan_read(*a))(*args), grad(factored_read)(*args)

        refs = jax.device_get(run(*args))
    return (vectors, resets, memory, wY, wM), (ref_Y, ref_M), refs


# chunk 7 leaves a ragged last chunk for most T; chunk 1 and 64 are the extremes
@READS
@pytest.mark.parametrize("seed, chunk", [(0, 7), (1, 1), (2, 64), (3, 4), (4, 5), (5, 3)])
def test_values_and_gradients_match_float64_references(read, seed, chunk):
    (vectors, resets, memory, wY, wM), (ref_Y, ref_M), refs = float64_references(seed, chunk)
    with jax.enable_x64(True):
        args = [jnp.asarray(a) for a in (*vectors, memory)]
        r, wYj, wMj = jnp.asarray(resets), jnp.asarray(wY), jnp.asarray(wM)

        @jax.jit  # one compile for the case
        def run(*args):
            grads = jax.grad(loss_fn(read, r, wYj, wMj, chunk), tuple(range(6)))(*args)
            return read(*args[:5], r, args[5], chunk=chunk), grads

        (Y, M_last), grads = run(*args)
    assert Y.dtype == M_last.dtype == jnp.float64
    assert rel_err(Y, ref_Y) < 1e-9
    assert rel_err(M_last, ref_M) < 1e-9
    for name, g, g_dense, g_factored in zip((*NAMES, "memory"), grads, *refs, strict=True):
        assert g.shape == g_dense.shape, name
        assert rel_err(g, g_dense) < 1e-9, name
        assert rel_err(g, g_factored) < 1e-9, name


@READS
def test_gradients_match_central_finite_differences(read):
    """A tiny case with a reset inside the sequence, a carried memory, two batch axes and a chunk
    that does not divide T; finite differences of the numpy loop, independent of JAX."""
    rng = np.random.default_rng(7)
    T, batch, H, chunk = 7, (2, 1), 3, 3
    vectors = [rng.normal(size=(T, *batch, H)) for _ in NAMES]
    resets = np.zeros((T, *batch), bool)
    resets[4, 0, 0] = True  # inside the sequence
    resets[0, 1, 0] = True  # at the start: the carried memory of (1, 0) is forgotten at once
    memory = rng.normal(size=(*batch, H, H))
    wY, wM = rng.normal(size=(T, *batch, H)), rng.normal(size=(*batch, H, H))

    def f(args):
        Y, M = numpy_read(*args[:5], resets, args[5])
        return float(np.sum(Y * wY) + np.sum(M * wM))

    args = [*vectors, memory]
    with jax.enable_x64(True):
        loss = loss_fn(read, jnp.asarray(resets), jnp.asarray(wY), jnp.asarray(wM), chunk)
        grads = jax.grad(loss, tuple(range(6)))(*map(jnp.asarray, args))
    eps = 1e-6
    for i, g in enumerate(grads):
        g = np.asarray(g).ravel()
        for j in range(g.size):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[i].ravel()[j] += eps
            minus[i].ravel()[j] -= eps
            fd = (f(plus) - f(minus)) / (2 * eps)
            assert abs(g[j] - fd) < 1e-7 * max(1.0, abs(fd)), (i, j, g[j], fd)
    # the reset at step 0 cuts batch element (1, 0) off from its carried-in memory
    assert np.all(np.asarray(grads[5])[1, 0] == 0.0)
    assert np.all(np.asarray(grads[5])[0, 0] != 0.0)


@READS
def test_defaults_and_no_gradient_to_resets(read):
    """resets=None is no resets, memory=None is a zero memory; resets get a float0 cotangent."""
    vectors, _, memory, _, _ = random_case(9, T=6)
    v = [jnp.asarray(a, jnp.float32) for a in vectors]
    zeros_r = jnp.zeros(v[0].shape[:-1], bool)
    zeros_M = jnp.zeros(memory.shape, jnp.float32)

    @jax.jit
    def run(v):
        Y, M = read(*v, chunk=4)
        (Y2, M2), vjp = jax.vjp(lambda *a: read(*a, chunk=4), *v, zeros_r, zeros_M)
        return Y, M, Y2, M2, vjp((jnp.ones_like(Y), jnp.ones_like(M)))

    Y, M, Y2, M2, cot = run(v)
    np.testing.assert_array_equal(np.asarray(Y), np.asarray(Y2))
    np.testing.assert_array_equal(np.asarray(M), np.asarray(M2))
    assert cot[5].dtype == jax.dtypes.float0
    assert all(np.all(np.isfinite(np.asarray(g))) for i, g in enumerate(cot) if i != 5)


@pytest.mark.parametrize(
    "T, batch, H, chunk, block_b, block_rows, prefetch, pipelined",
    [
        (
            11,
            (3,),
            3,
            4,
            2,
            32,
            False,
            False,
        ),  # ragged last chunk; batch, H padded to 4; 1 row block
        (16, (2, 2), 8, 8, 4, 2, False, False),  # two batch axes; 4 row blocks whose partials add
        (
            16,
            (2, 2),
            8,
            8,
            4,
            2,
            True,
            False,
        ),  # the same, loads before the chunk's work, stores after
        (
            9,
            (3,),
            6,
            3,
            1,
            4,
            True,
            False,
        ),  # H padded to 8 in 2 row blocks, the second half padding
        # pipelined: whole-chunk loads one chunk ahead, one store per chunk
        (11, (3,), 3, 4, 2, 32, None, True),  # ragged: T padded to 12, 3 chunks of 4
        (16, (2, 2), 8, 8, 4, 2, None, True),  # 2 chunks of 8, 4 row blocks
        (9, (3,), 6, 3, 1, 4, None, True),  # chunk 3 rounded down to 2: T padded to 10
        (5, (2,), 4, 8, 1, 4, None, True),  # chunk capped at T = 5, then 4: one chunk and a half
    ],
)
def test_pallas_matches_float64_references(
    T, batch, H, chunk, block_b, block_rows, prefetch, pipelined
):
    rng = np.random.default_rng(T)
    vectors = [rng.normal(size=(T, *batch, H)) for _ in NAMES]
    resets = rng.random((T, *batch)) < 0.2
    memory = rng.normal(size=(*batch, H, H))
    wY, wM = rng.normal(size=(T, *batch, H)), rng.normal(size=(*batch, H, H))
    ref_Y, ref_M = numpy_read(*vectors, resets, memory)
    with jax.enable_x64(True):
        args = [jnp.asarray(a) for a in (*vectors, memory)]
        r, wYj, wMj = jnp.asarray(resets), jnp.asarray(wY), jnp.asarray(wM)
        pallas = lambda *a, chunk: pallas_read(
            *a,
            chunk=chunk,
            block_b=block_b,
            block_rows=block_rows,
            prefetch=prefetch,
            pipelined=pipelined,
            interpret=True,
        )
        grad = lambda read: jax.grad(loss_fn(read, r, wYj, wMj, chunk), tuple(range(6)))

        @jax.jit
        def run(*args):
            return (
                pallas(*args[:5], r, args[5], chunk=chunk),
                grad(pallas)(*args),
                grad(lambda *a, chunk: dense_scan_read(*a))(*args),
            )

        (Y, M_last), grads, ref_grads = run(*args)
    assert rel_err(Y, ref_Y) < 1e-9
    assert rel_err(M_last, ref_M) < 1e-9
    for name, g, g_ref in zip((*NAMES, "memory"), grads, ref_grads, strict=True):
        assert g.shape == g_ref.shape, name
        assert rel_err(g, g_ref) < 1e-9, name


def test_pallas_default_blocks():
    """Whole rows when the batch gives enough programs; else halve the rows (not below 8) until
    it does; 2 warps for up to 1024 memory entries per program. Where whole rows would not fill
    the GPU, prefetch and chunks of 4, else chunks of 8 without prefetch. The measured best
    configs: (1024, 8, 128) -> 8 rows, chunk 4, 2 warps, prefetch (H200); (1024, 512, 32) ->
    32 rows (H100)."""
    assert pallas_blocks(8, 128) == PallasConfig(1, 8, 4, 2, True)
    assert pallas_blocks(512, 32) == PallasConfig(1, 32, 8, 2, False)
    assert pallas_blocks(64, 128) == PallasConfig(1, 16, 4, 4, True)
    assert pallas_blocks(3, 24) == PallasConfig(1, 8, 4, 2, True)  # H padded to 32
    for B, H in [(1, 8), (8, 128), (64, 32), (100, 64), (512, 256)]:
        bB, bR, chunk, _, prefetch = pallas_blocks(B, H)
        Hp = 1 << (H - 1).bit_length()
        assert Hp % bR == 0 and bR >= min(8, Hp)
        assert B // bB * Hp // bR >= PALLAS_MIN_PROGRAMS or bR == min(8, Hp)
        assert prefetch == (B // bB < PALLAS_MIN_PROGRAMS) and chunk == (4 if prefetch else 8)
    with pytest.raises(ValueError, match="num_warps must be a positive int"):
        pallas_read(*[jnp.zeros((2, 1, 4))] * 5, num_warps=0)
    with pytest.raises(ValueError, match="pipelined must be True or False"):
        pallas_read(*[jnp.zeros((2, 1, 4))] * 5, pipelined="yes")


@pytest.mark.parametrize("io", ["step", "prefetch", "pipelined"])
def test_pallas_kernels_lower_for_a_gpu(io):
    """Forward and backward kernels lower to Triton (what a GPU compiles) for every way of
    moving a chunk's data: the ops they use are ones Pallas' Triton lowering supports. A CPU
    lowers without running anything."""
    T, B, H = 16, 2, 32
    v = [jnp.ones((T, B, H))] * 5
    kwargs = dict(prefetch=io == "prefetch", pipelined=io == "pipelined", interpret=False)

    def loss(*a):
        Y, M_last = pallas_read(*a[:5], None, a[5], chunk=4, block_rows=8, **kwargs)
        return jnp.sum(Y * Y) + jnp.sum(M_last)

    traced = jax.jit(jax.grad(loss, tuple(range(6)))).trace(*v, jnp.zeros((B, H, H)))
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2  # the forward and the backward kernel


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(fused_read, id="fused"),
        NATIVE,
        pytest.param(pallas_read, id="pallas"),
        pytest.param(functools.partial(pallas_read, pipelined=True), id="pallas_pipelined"),
    ],
)
def test_inf_before_a_reset_does_not_leak(read):
    """A memory that overflowed in one episode must not turn the next episode's values or
    gradients into NaN (0 · inf): resets are selects, never products."""
    T, B, H = 6, 2, 3
    rng = np.random.default_rng(3)
    v = [jnp.asarray(rng.normal(size=(T, B, H)), jnp.float32) for _ in NAMES]
    resets = jnp.zeros((T, B), bool).at[3].set(True)
    memory = jnp.full((B, H, H), jnp.inf)

    def loss(*args):
        Y = read(*args[:5], resets, args[5], chunk=2)[0]
        return jnp.sum(Y[3:]), Y

    grads, Y = jax.jit(jax.grad(loss, tuple(range(6)), has_aux=True))(*v, memory)
    assert np.all(np.isfinite(np.asarray(Y[3:])))
    for g in grads[:5]:  # (before the reset, 0 · inf in dC_t = G_t ⊙ M_{t-1} is the true math)
        assert np.all(np.isfinite(np.asarray(g[3:])))
    assert np.all(np.asarray(grads[5]) == 0.0)  # nothing after the reset reaches the old memory


@READS
def test_vmap_equals_a_batch_axis(read):
    """Under vmap (as over seeds or envs), values and gradients equal those with the mapped axis
    as a batch axis."""
    rng = np.random.default_rng(4)
    T, batch, H = 9, (3, 2), 4
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    v = [f32(T, *batch, H) for _ in NAMES] + [f32(*batch, H, H)]
    r = jnp.asarray(rng.random((T, *batch)) < 0.2)
    wY, wM = f32(T, *batch, H), f32(*batch, H, H)

    def loss(*args):  # mapped over the first batch axis (axis 1 of vectors, 0 of memory)
        Y, M = read(*args[:5], args[6], args[5], chunk=4)
        return jnp.sum(Y * args[7]) + jnp.sum(M * args[8])

    grad = jax.grad(loss, tuple(range(6)))
    axes = (1,) * 5 + (0, 1, 1, 0)
    mapped = jax.jit(jax.vmap(grad, in_axes=axes, out_axes=(1,) * 5 + (0,)))(*v, r, wY, wM)
    direct = jax.jit(grad)(*v, r, wY, wM)
    for a, b in zip(mapped, direct, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_layer_pallas_pipelined_matches_sequential_and_pallas_warns_once_on_cpu():
    """SHM(method="pallas_pipelined") gives the numbers of "sequential" (values and gradients).
    On a CPU both Pallas methods run interpreted: the first trace per method warns, naming what
    "auto" runs there; later ones do not."""
    from shm_jax import SHM, shm

    T, B, D, H = 7, 2, 5, 4
    x = jax.random.normal(jax.random.PRNGKey(0), (T, B, D))
    resets = jnp.zeros((T, B), bool).at[3, 1].set(True)
    base = SHM(size=H, method="sequential")
    aux = base.sample_aux(jax.random.PRNGKey(1), (T, B))
    carry = jax.random.normal(jax.random.PRNGKey(2), (B, H, H))
    params = base.init(jax.random.PRNGKey(3), carry, x, resets, aux)

    def grads(method):
        def loss(p, x):
            M, y = SHM(size=H, method=method).apply(p, carry, x, resets, aux)
            return jnp.sum(jnp.sin(y)) + jnp.sum(M), (M, y)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)

    ref, got = (jax.jit(grads(m))(params, x) for m in ("sequential", "pallas_pipelined"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)

    on_cpu = jax.default_backend() == "cpu"
    for method in ("pallas", "pallas_pipelined"):
        shm.warn_interpreted.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # each eval_shape traces the layer, where the method resolves
                jax.eval_shape(grads(method), params, x)
        said = [str(w.message) for w in caught if "kernel in its interpreter" in str(w.message)]
        assert len(said) == (1 if on_cpu else 0), method
        assert all(f"method {method!r}" in m and "method='auto' (=" in m for m in said)
