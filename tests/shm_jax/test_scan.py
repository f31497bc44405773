"""The Hadamard scans against an independent float64 numpy loop, and gradients against central
finite differences (all in float64 via jax.enable_x64, scoped to this module's calls)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shm_jax.scan import choose_method, hadamard_read, hadamard_scan

METHODS = ["sequential", "associative", "chunked", "auto"]


def numpy_loop(C, U, q, resets, memory):
    """Plain float64 loop of M_t = C_t ⊙ M_{t-1} + U_t (M_t = U_t at a reset), Y_t = M_t q_t."""
    T = C.shape[0]
    M = np.zeros(C.shape[1:]) if memory is None else memory.astype(np.float64).copy()
    Ms, Ys = [], []
    for t in range(T):
        if resets is not None:
            M = np.where(resets[t][..., None, None], 0.0, M)
        M = C[t] * M + U[t]
        Ms.append(M.copy())
        Ys.append(np.einsum("...ij,...j->...i", M, q[t]))
    return np.stack(Ms), np.stack(Ys)


def random_case(seed):
    rng = np.random.default_rng(seed)
    T = int(rng.integers(1, 70))
    batch = tuple(int(b) for b in rng.integers(1, 4, size=rng.integers(0, 3)))
    H = int(rng.integers(1, 7))
    C = rng.uniform(0.0, 2.0, (T, *batch, H, H))  # SHM's C lies in (0, 2)
    U = rng.normal(size=(T, *batch, H, H))
    q = rng.normal(size=(T, *batch, H))
    resets = rng.random((T, *batch)) < 0.15
    memory = rng.normal(size=(*batch, H, H))
    return C, U, q, resets, memory


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / (np.max(np.abs(b)) + 1e-300))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", METHODS)
def test_scan_matches_numpy_loop(seed, method):
    C, U, q, resets, memory = random_case(seed)
    ref_M, ref_Y = numpy_loop(C, U, q, resets, memory)
    with jax.enable_x64(True):
        args = [jnp.asarray(a) for a in (C, U, q, resets, memory)]

        @jax.jit  # one compile instead of op-by-op dispatch of the scans' many small ops
        def run(C, U, q, r, m):
            return (
                hadamard_scan(C, U, resets=r, memory=m, method=method),
                hadamard_read(C, U, q, resets=r, memory=m, method=method, chunk_size=7),
            )

        (M_all, M_last), (Y, M_last_r) = run(*args)
        assert M_all.dtype == jnp.float64
    assert rel_err(M_all, ref_M) < 1e-9
    assert rel_err(M_last, ref_M[-1]) < 1e-9
    assert rel_err(Y, ref_Y) < 1e-9
    assert rel_err(M_last_r, ref_M[-1]) < 1e-9


@pytest.mark.parametrize("method", ["sequential", "associative", "chunked"])
def test_no_resets_no_memory_defaults_to_zero_start(method):
    C, U, q, _, _ = random_case(11)
    ref_M, ref_Y = numpy_loop(C, U, q, None, None)
    with jax.enable_x64(True):
        Y, M_last = hadamard_read(jnp.asarray(C), jnp.asarray(U), jnp.asarray(q), method=method)
    assert rel_err(Y, ref_Y) < 1e-9
    assert rel_err(M_last, ref_M[-1]) < 1e-9


def test_reset_is_a_separate_episode():
    """A reset at step s gives exactly the states of a fresh run started at s."""
    C, U, q, _, memory = random_case(3)
    T = C.shape[0]
    s = T // 2
    resets = np.zeros(C.shape[:-2], bool)
    resets[s] = True
    with jax.enable_x64(True):
        Y, _ = hadamard_read(*map(jnp.asarray, (C, U, q)), resets=jnp.asarray(resets))
        Y2, _ = hadamard_read(*map(jnp.asarray, (C[s:], U[s:], q[s:])))
    np.testing.assert_allclose(np.asarray(Y[s:]), np.asarray(Y2), rtol=1e-12, atol=1e-12)


def test_segments_compose_through_carried_memory():
    """Two halves with the first half's M_last carried in equal one whole run."""
    C, U, q, resets, _ = random_case(5)
    s = C.shape[0] // 2
    with jax.enable_x64(True):
        a = [jnp.asarray(x) for x in (C, U, q, resets)]
        Y, M_last = hadamard_read(*a[:3], resets=a[3])
        Y1, M1 = hadamard_read(*(x[:s] for x in a[:3]), resets=a[3][:s])
        Y2, M2 = hadamard_read(*(x[s:] for x in a[:3]), resets=a[3][s:], memory=M1)
    np.testing.assert_allclose(np.concatenate([Y1, Y2]), np.asarray(Y), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(M2), np.asarray(M_last), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["sequential", "associative", "chunked"])
def test_gradients_match_central_finite_differences(method):
    rng = np.random.default_rng(7)
    T, B, H = 9, 2, 3
    C = rng.uniform(0.2, 1.8, (T, B, H, H))
    U = rng.normal(size=(T, B, H, H))
    q = rng.normal(size=(T, B, H))
    memory = rng.normal(size=(B, H, H))
    resets = np.zeros((T, B), bool)
    resets[4, 1] = True
    w = rng.normal(size=(T, B, H))  # a random linear functional of the read-outs

    with jax.enable_x64(True):

        def loss(C, U, q, memory):
            Y, M_last = hadamard_read(
                C, U, q, resets=jnp.asarray(resets), memory=memory, method=method, chunk_size=4
            )
            return jnp.sum(Y * w) + jnp.sum(jnp.sin(M_last))

        args = [jnp.asarray(a) for a in (C, U, q, memory)]
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
        f = jax.jit(loss)
        eps = 1e-6
        for i, g in enumerate(grads):
            g = np.asarray(g)
            assert np.all(np.isfinite(g))
            flat = np.asarray(args[i]).ravel()
            for j in rng.choice(flat.size, size=min(12, flat.size), replace=False):
                plus, minus = flat.copy(), flat.copy()
                plus[j] += eps
                minus[j] -= eps
                a_p, a_m = list(args), list(args)
                a_p[i] = jnp.asarray(plus.reshape(args[i].shape))
                a_m[i] = jnp.asarray(minus.reshape(args[i].shape))
                fd = (float(f(*a_p)) - float(f(*a_m))) / (2 * eps)
                assert abs(g.ravel()[j] - fd) < 1e-6 * max(1.0, abs(fd)), (i, j, g.ravel()[j], fd)


@pytest.mark.parametrize("method", ["sequential", "associative", "chunked"])
def test_overflowed_memory_does_not_leak_past_a_reset(method):
    """An inf memory before a reset gives finite values and gradients after it (a reset is a
    select, never a product 0 · inf = NaN); the resets fall inside and at the start of chunks."""
    rng = np.random.default_rng(1)
    T, B, H = 8, 2, 3
    C = jnp.asarray(rng.uniform(0.5, 1.5, (T, B, H, H)), jnp.float32)
    U = jnp.asarray(rng.normal(size=(T, B, H, H)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(T, B, H)), jnp.float32)
    starts = (3, 5)  # episode start of each batch element
    resets = jnp.zeros((T, B), bool).at[starts[0], 0].set(True).at[starts[1], 1].set(True)
    after = np.arange(T)[:, None] >= np.asarray(starts)  # [T, B]
    memory = jnp.full((B, H, H), jnp.inf)

    def loss(C, U, q):
        Y, M_last = hadamard_read(
            C, U, q, resets=resets, memory=memory, method=method, chunk_size=3
        )
        return jnp.sum(jnp.where(after[..., None], Y, 0.0)) + jnp.sum(M_last), (Y, M_last)

    grads, (Y, M_last) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(C, U, q)
    M_all, _ = jax.jit(
        lambda C, U: hadamard_scan(C, U, resets=resets, memory=memory, method=method)
    )(C, U)
    assert np.all(np.isfinite(np.asarray(Y)[after]))
    assert np.all(np.isfinite(np.asarray(M_all)[after]))
    assert np.all(np.isfinite(np.asarray(M_last)))
    for g in grads:  # (before the reset, 0 · inf in the gradients is the true math)
        assert np.all(np.isfinite(np.asarray(g)[after]))


def test_reset_blocks_gradient_to_the_past():
    rng = np.random.default_rng(0)
    T, H = 6, 3
    C = jnp.asarray(rng.uniform(0.5, 1.5, (T, 1, H, H)), jnp.float32)
    U = jnp.asarray(rng.normal(size=(T, 1, H, H)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(T, 1, H)), jnp.float32)
    resets = jnp.zeros((T, 1), bool).at[3].set(True)
    for method in ["sequential", "associative", "chunked"]:
        gU = jax.grad(lambda U: hadamard_read(C, U, q, resets=resets, method=method)[0][3:].sum())(
            U
        )
        assert np.all(np.asarray(gU[:3]) == 0.0)
        assert np.all(np.asarray(gU[3:]) != 0.0)


def test_bad_input_is_a_clear_error():
    C = jnp.ones((4, 2, 3, 3))
    with pytest.raises(ValueError, match="unknown scan method 'fast'"):
        hadamard_scan(C, C, method="fast")
    with pytest.raises(ValueError, match=r"U must have C's shape"):
        hadamard_scan(C, jnp.ones((4, 2, 3, 2)))
    with pytest.raises(ValueError, match=r"C must have shape \[T, \*batch, H, H\]"):
        hadamard_scan(jnp.ones((4, 3, 2)), jnp.ones((4, 3, 2)))
    with pytest.raises(ValueError, match=r"resets must have shape \[T, \*batch\]"):
        hadamard_scan(C, C, resets=jnp.zeros((4,), bool))
    with pytest.raises(ValueError, match=r"memory must have shape"):
        hadamard_scan(C, C, memory=jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"q must have shape"):
        hadamard_read(C, C, jnp.ones((4, 2, 2)))
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        hadamard_read(C, C, jnp.ones((4, 2, 3)), chunk_size=0)


def test_auto_rule():
    assert choose_method(1024, 8, 128, backend="cpu") == "sequential"
    assert choose_method(128, 64, 32, backend="gpu") == "associative"
    assert choose_method(1024, 64, 128, backend="gpu") == "chunked"  # 16 GiB of M_t copies
    # the 8 GiB budget: T·B·H² · 4 bytes · 4 copies
    assert choose_method(2048, 64, 64, backend="gpu") == "associative"  # exactly 8 GiB
    assert choose_method(2049, 64, 64, backend="gpu") == "chunked"


def test_layer_auto_rule(monkeypatch):
    """The SHM layer's "auto": the Pallas kernel on a GPU and the native kernel on a CPU where
    the fused form applies (θ calibration, no clamp), else the scan's rule; on a CPU without the
    native kernel, fused_read ("sequential") with a warning."""
    from shm_jax import native
    from shm_jax.shm import layer_method

    assert layer_method(1024, 8, 128, fused=True, backend="gpu") == "pallas"
    assert layer_method(1, 64, 128, fused=True, backend="gpu") == "pallas"
    assert layer_method(1024, 8, 128, fused=False, backend="gpu") == "associative"
    assert layer_method(1024, 64, 128, fused=False, backend="gpu") == "chunked"
    assert layer_method(1024, 8, 128, fused=False, backend="cpu") == "sequential"
    assert layer_method(1024, 8, 128, fused=True, backend="tpu") == "associative"
    monkeypatch.setattr(native, "available", lambda: True)
    assert layer_method(1024, 8, 128, fused=True, backend="cpu") == "native"
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C++ compiler found")
    native.warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert layer_method(1024, 8, 128, fused=True, backend="cpu") == "sequential"
    native.warn_fallback.cache_clear()


@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_training_memory_is_bounded(method):
    """fwd+bwd at T=1024, B=8, H=128: rematerialised chunks keep the temporaries below one copy of
    all M_t (0.5 GiB in float32); a plain lax.scan keeps two (measured 1026 MiB), the associative
    form six (3026 MiB)."""
    T, B, H = 1024, 8, 128
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(T, B, H, H)] * 2 + [(T, B, H)]]

    def loss(C, U, q):
        return hadamard_read(C, U, q, method=method)[0].sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    one_copy = T * B * H * H * 4
    # Beyond inputs and outputs (C, U and their gradients), temporaries stay under one copy.
    assert stats.temp_size_in_bytes < 0.75 * one_copy, stats.temp_size_in_bytes
