"""Every memory: step-by-step equals the sequence call, resets equal separate episodes; the SHM
layer against an independent float64 numpy implementation of the spec's equations; θ replay; the
registry's errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shm_jax
from shm_jax import SHM, make_memory, memory_names

T, B, D, H = 13, 3, 5, 4
# The layer's methods; "native" is the CPU kernel, whose FFI handlers exist on the CPU only.
METHODS = [
    "sequential",
    "associative",
    "chunked",
    "pallas",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            jax.default_backend() != "cpu",
            reason="method 'native' is the CPU kernel: its FFI handlers are registered for the "
            "CPU only",
        ),
    ),
]


@pytest.fixture(scope="module")
def inputs():
    kx, kr = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (T, B, D))
    resets = jax.random.bernoulli(kr, 0.2, (T, B)).at[0].set(True)
    return x, resets


def build(name, x, resets, **kwargs):
    module = make_memory(name, size=H, features=6, **kwargs)
    carry = module.initialize_carry((B,))
    aux = module.sample_aux(jax.random.PRNGKey(2), (T, B))
    params = module.init(jax.random.PRNGKey(3), carry, x, resets, aux)
    return module, params, carry, aux


@pytest.mark.parametrize("name", memory_names)
def test_step_by_step_equals_sequence(name, inputs):
    x, resets = inputs
    module, params, carry, aux = build(name, x, resets)
    apply = jax.jit(module.apply)
    carry_T, y = apply(params, carry, x, resets, aux)
    assert y.shape == (T, B, 6)
    c, ys = carry, []
    for t in range(T):
        c, yt = apply(params, c, x[t : t + 1], resets[t : t + 1], aux[t : t + 1])
        ys.append(yt)
    np.testing.assert_allclose(np.concatenate(ys), np.asarray(y), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(c, carry_T, rtol=1e-5, atol=1e-5)  # carries may be pytrees


@pytest.mark.parametrize("name", memory_names)
def test_resets_equal_separate_episodes(name, inputs):
    x, _ = inputs
    s = 6
    resets = jnp.zeros((T, B), bool).at[s].set(True)
    module, params, carry, aux = build(name, x, resets)
    # a carried-in state must be forgotten at the reset, too: one the memory itself wrote
    # (adding 1 to every leaf changes nothing in an mLSTM that has not started: m = -1e30)
    carry, _ = module.apply(params, carry, -x, jnp.zeros_like(resets), aux)
    _, y = module.apply(params, carry, x, resets, aux)
    _, y2 = module.apply(params, module.initialize_carry((B,)), x[s:], resets[s:], aux[s:])
    np.testing.assert_allclose(np.asarray(y[s:]), np.asarray(y2), rtol=1e-5, atol=1e-5)
    # and before the reset the carried state mattered
    _, y0 = module.apply(params, module.initialize_carry((B,)), x, resets, aux)
    assert not np.allclose(np.asarray(y[:s]), np.asarray(y0[:s]))


def numpy_shm(p, M, x, resets, aux, calibration, record=None):
    """The spec's equations in float64 numpy, one step at a time; `record`, if a dict of lists,
    gets every step's C, U and M (after the step) appended."""
    f = lambda a: np.asarray(a, np.float64)
    Wk, Wq, Wv = (f(p[n]["kernel"]) for n in ("key_proj", "query_proj", "value_proj"))
    we, Ws, bs = f(p["eta_proj"]["kernel"]), f(p["shortcut"]["kernel"]), f(p["shortcut"]["bias"])
    Wo, bo = f(p["out_proj"]["kernel"]), f(p["out_proj"]["bias"])
    g, b = f(p["norm"]["scale"]), f(p["norm"]["bias"])
    M = f(M).copy()
    outs = []
    for t in range(x.shape[0]):
        xt = f(x[t])
        mu, var = xt.mean(-1, keepdims=True), xt.var(-1, keepdims=True)
        xh = (xt - mu) / np.sqrt(var + 1e-6) * g + b
        k = np.maximum(xh @ Wk, 0)
        k = k / (1e-5 + k.sum(-1, keepdims=True))
        q = np.maximum(xh @ Wq, 0)
        q = q / (1e-5 + q.sum(-1, keepdims=True))
        v = xh @ Wv
        eta = 1 / (1 + np.exp(-(xh @ we)))
        if calibration == "none":
            C = np.ones_like(M)
        elif calibration == "fixed":
            C = np.broadcast_to(f(p["fixed_calibration"]), M.shape)
        else:
            theta = f(p["theta"])[np.asarray(aux[t])]
            c = xh @ f(p["calib_proj"]["kernel"])
            C = 1 + np.tanh(theta[:, :, None] * c[:, None, :])
        M = np.where(np.asarray(resets[t])[:, None, None], 0.0, M)
        U = eta[:, :, None] * v[:, :, None] * k[:, None, :]
        M = C * M + U
        if record is not None:
            for name, value in (("C", C), ("U", U), ("M", M)):
                if name in record:
                    record[name].append(np.broadcast_to(value, M.shape).copy())
            vectors = dict(x_hat=xh, k=k, q=q, eta_v=eta * v)
            if calibration in ("shm", "single_theta"):
                vectors.update(theta=theta, c=c)
            for name, value in vectors.items():
                if name in record:
                    record[name].append(value)
        y = np.einsum("bij,bj->bi", M, q) + xh @ Ws + bs
        outs.append(y @ Wo + bo)
    return np.stack(outs), M


@pytest.mark.parametrize("calibration", ["shm", "none", "fixed", "single_theta"])
@pytest.mark.parametrize("method", METHODS)
def test_shm_matches_numpy_reference(calibration, method, inputs):
    x, resets = inputs
    if method in ("pallas", "native") and calibration in ("none", "fixed"):
        with pytest.raises(ValueError, match=f"method '{method}' computes C_t = 1 \\+ tanh"):
            SHM(size=H, calibration=calibration, method=method)
        return
    with jax.enable_x64(True):
        module = SHM(size=H, calibration=calibration, method=method, dtype=jnp.float64)
        aux = module.sample_aux(jax.random.PRNGKey(5), (T, B))
        carry = jax.random.normal(jax.random.PRNGKey(6), (B, H, H), jnp.float64)
        xd = jnp.asarray(x, jnp.float64)
        params = module.init(jax.random.PRNGKey(7), carry, xd, resets, aux)
        M_last, y = module.apply(params, carry, xd, resets, aux)
    ref_y, ref_M = numpy_shm(params["params"], carry, xd, resets, aux, calibration)
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(M_last), ref_M, rtol=1e-9, atol=1e-12)
    if calibration == "single_theta":
        assert np.all(np.asarray(aux) == 0)


def test_theta_replay(inputs):
    """The same θ indices give the same outputs; other indices give other outputs."""
    x, resets = inputs
    module, params, carry, aux = build("shm", x, resets)
    _, y1 = module.apply(params, carry, x, resets, aux)
    _, y2 = module.apply(params, carry, x, resets, aux)
    other = module.sample_aux(jax.random.PRNGKey(99), (T, B))
    _, y3 = module.apply(params, carry, x, resets, other)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    assert np.abs(np.asarray(y1) - np.asarray(y3)).max() > 1e-4
    assert aux.dtype == jnp.int32 and int(aux.min()) >= 0 and int(aux.max()) < 128


def test_clamp_bounds_the_memory(inputs):
    x, resets = inputs
    module = SHM(size=H, calibration="none", clamp=0.05)
    aux = module.sample_aux(jax.random.PRNGKey(0), (T, B))
    carry = module.initialize_carry((B,))
    params = module.init(jax.random.PRNGKey(1), carry, 100 * x, resets, aux)
    M_last, _ = module.apply(params, carry, 100 * x, jnp.zeros_like(resets), aux)
    assert float(jnp.abs(M_last).max()) <= 0.05 + 1e-7
    M_free, _ = SHM(size=H, calibration="none").apply(
        params, carry, 100 * x, jnp.zeros_like(resets), aux
    )
    assert float(jnp.abs(M_free).max()) > 0.05


@pytest.mark.parametrize("calibration", ["shm", "none", "fixed", "single_theta"])
def test_memory_trace_matches_numpy_loop_and_the_layer(calibration, inputs):
    """Every step's C_t, U_t and M_t (resets applied, a random carried-in memory) against the
    float64 numpy loop M_t = C_t ⊙ M_{t-1} + U_t; its last M_t is the layer's carry."""
    x, resets = inputs
    module = SHM(size=H, calibration=calibration)
    aux = module.sample_aux(jax.random.PRNGKey(5), (T, B))
    carry = jax.random.normal(jax.random.PRNGKey(6), (B, H, H))
    params = module.init(jax.random.PRNGKey(7), carry, x, resets, aux)
    trace = module.apply(params, carry, x, resets, aux, method="memory_trace")
    record = {"C": [], "U": [], "M": []}
    numpy_shm(params["params"], carry, x, resets, aux, calibration, record)
    for name in ("C", "U", "M"):
        assert trace[name].shape == (T, B, H, H)
        ref = np.stack(record[name])
        np.testing.assert_allclose(np.asarray(trace[name]), ref, rtol=1e-5, atol=1e-5, err_msg=name)
    M_last, _ = module.apply(params, carry, x, resets, aux)
    np.testing.assert_allclose(np.asarray(trace["M"][-1]), np.asarray(M_last), rtol=1e-5, atol=1e-6)
    if calibration == "shm":
        assert float(trace["C"].min()) > 0 and float(trace["C"].max()) < 2


@pytest.mark.parametrize("calibration", ["shm", "none"])
def test_vectors_match_numpy_loop(calibration, inputs):
    """`SHM.vectors` (for inspection) gives the spec's x̂_t, k_t, q_t, η_t v_t (and θ_t, c_t for
    θ calibration) at every step, as the float64 loop computes them."""
    x, resets = inputs
    module = SHM(size=H, calibration=calibration)
    aux = module.sample_aux(jax.random.PRNGKey(5), (T, B))
    carry = module.initialize_carry((B,))
    params = module.init(jax.random.PRNGKey(7), carry, x, resets, aux)
    got = module.apply(params, carry, x, resets, aux, method="vectors")
    names = ["x_hat", "k", "q", "eta_v"] + (["theta", "c"] if calibration == "shm" else [])
    assert sorted(got) == sorted(names)
    record = {name: [] for name in names}
    numpy_shm(params["params"], carry, x, resets, aux, calibration, record)
    for name in names:
        ref = np.stack(record[name])
        assert got[name].shape == ref.shape, name
        np.testing.assert_allclose(np.asarray(got[name]), ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_memory_trace_with_clamp_matches_the_layer(inputs):
    x, resets = inputs
    module = SHM(size=H, clamp=0.05)
    aux = module.sample_aux(jax.random.PRNGKey(0), (T, B))
    carry = module.initialize_carry((B,))
    params = module.init(jax.random.PRNGKey(1), carry, 100 * x, resets, aux)
    trace = module.apply(params, carry, 100 * x, resets, aux, method="memory_trace")
    M_last, _ = module.apply(params, carry, 100 * x, resets, aux)
    assert float(jnp.abs(trace["M"]).max()) <= 0.05 + 1e-7
    np.testing.assert_allclose(np.asarray(trace["M"][-1]), np.asarray(M_last), rtol=1e-6)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown memory 'lstm'; choose one of .*gru.*shm"):
        make_memory("lstm", size=4)
    with pytest.raises(ValueError, match="memory size must be a positive int"):
        make_memory("shm", size=0)
    with pytest.raises(ValueError, match="unknown calibration 'bad'"):
        SHM(size=4, calibration="bad")
    with pytest.raises(ValueError, match="unknown method 'fast'; choose one of .*pallas"):
        SHM(size=4, method="fast")
    with pytest.raises(ValueError, match="unknown calib_init 'ones'; choose one of lecun"):
        SHM(size=4, calib_init="ones")
    with pytest.raises(ValueError, match="calibration 'none' does not have"):
        SHM(size=4, calibration="none", calib_init="zeros")
    assert {"shm", "gru", "lru", "shm_nocal", "shm_fixed", "shm_single"} <= set(memory_names)
    assert shm_jax.make_memory("shm_fixed", size=3).calibration == "fixed"


def test_clamp_matches_numpy_reference(inputs):
    """With a clamp, M_t = clip(C_t ⊙ M_{t-1} + U_t) at every step (float64 numpy loop)."""
    x, resets = inputs
    module = SHM(size=H, calibration="none", clamp=0.05)
    aux = module.sample_aux(jax.random.PRNGKey(0), (T, B))
    carry = module.initialize_carry((B,))
    params = module.init(jax.random.PRNGKey(1), carry, x, resets, aux)
    M_last, _ = module.apply(params, carry, 100 * x, resets, aux)
    p = params["params"]
    f = lambda a: np.asarray(a, np.float64)
    M = np.zeros((B, H, H))
    for t in range(T):
        xt = f(100 * x[t])
        xh = (xt - xt.mean(-1, keepdims=True)) / np.sqrt(xt.var(-1, keepdims=True) + 1e-6)
        xh = xh * f(p["norm"]["scale"]) + f(p["norm"]["bias"])
        k = np.maximum(xh @ f(p["key_proj"]["kernel"]), 0)
        k = k / (1e-5 + k.sum(-1, keepdims=True))
        eta = 1 / (1 + np.exp(-(xh @ f(p["eta_proj"]["kernel"]))))
        v = xh @ f(p["value_proj"]["kernel"])
        M = np.where(np.asarray(resets[t])[:, None, None], 0.0, M)
        M = np.clip(M + eta[:, :, None] * v[:, :, None] * k[:, None, :], -0.05, 0.05)
    np.testing.assert_allclose(np.asarray(M_last), M, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", memory_names)
def test_any_batch_shape(name):
    """carry / aux / resets may have several batch axes ([T, E, B, ...]), as under a vmap-free
    population of agents."""
    module = make_memory(name, size=3, features=2, **({"clamp": 1.0} if name == "shm" else {}))
    carry = module.initialize_carry((2, 3))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 3, 5))
    resets = jnp.zeros((4, 2, 3), bool).at[2, 1, 0].set(True)
    aux = module.sample_aux(jax.random.PRNGKey(1), (4, 2, 3))
    params = module.init(jax.random.PRNGKey(2), carry, x, resets, aux)
    carry_T, y = module.apply(params, carry, x, resets, aux)
    assert y.shape == (4, 2, 3, 2)
    assert jax.tree.map(jnp.shape, carry_T) == jax.tree.map(jnp.shape, carry)
    # the same numbers as the flattened batch
    flat = lambda a, n: a.reshape(a.shape[:n] + (6,) + a.shape[n + 2 :])
    carry_f = jax.tree.map(lambda a: flat(a, 0), carry)
    carry_f, y_f = module.apply(params, carry_f, flat(x, 1), flat(resets, 1), flat(aux, 1))
    np.testing.assert_allclose(np.asarray(flat(y, 1)), np.asarray(y_f), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"method": m} for m in ("sequential", "associative", "chunked")] + [{"clamp": 100.0}],
)
def test_shm_resets_none_means_no_resets(kwargs, inputs):
    x, _ = inputs
    module = SHM(size=H, **kwargs)
    aux = module.sample_aux(jax.random.PRNGKey(0), (T, B))
    carry = jax.random.normal(jax.random.PRNGKey(1), (B, H, H))
    no_resets = jnp.zeros((T, B), bool)
    params = module.init(jax.random.PRNGKey(2), carry, x, no_resets, aux)
    M, y = module.apply(params, carry, x, None, aux)
    M2, y2 = module.apply(params, carry, x, no_resets, aux)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))
    np.testing.assert_array_equal(np.asarray(M), np.asarray(M2))


def test_shm_aux_none(inputs):
    """calibration "shm" needs the θ indices and says so; "single_theta" (always Θ[0]) and the
    uncalibrated variants do not."""
    x, resets = inputs
    module = SHM(size=H)
    carry = module.initialize_carry((B,))
    aux = module.sample_aux(jax.random.PRNGKey(1), (T, B))
    params = module.init(jax.random.PRNGKey(0), carry, x, resets, aux)
    with pytest.raises(ValueError, match=r"needs aux.*layer\.sample_aux\(key, \(T, B\)\)"):
        module.apply(params, carry, x, resets, None)
    single = SHM(size=H, calibration="single_theta")
    aux0 = single.sample_aux(None, (T, B))
    _, y = single.apply(params, carry, x, resets, None)
    _, y0 = single.apply(params, carry, x, resets, aux0)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    nocal = SHM(size=H, calibration="none")
    p_nocal = nocal.init(jax.random.PRNGKey(0), carry, x, resets, aux0)
    assert nocal.apply(p_nocal, carry, x, resets, None)[1].shape == (T, B, H)


def test_gru_unroll_changes_nothing_but_speed(inputs):
    """The same numbers up to float32 rounding, for values and gradients."""
    x, resets = inputs
    gru, gru4 = make_memory("gru", size=H), make_memory("gru", size=H, unroll=4)
    carry = gru.initialize_carry((B,))
    aux = gru.sample_aux(None, (T, B))
    params = gru.init(jax.random.PRNGKey(0), carry, x, resets, aux)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, carry, x, resets, aux)[1]))

    for module in (gru, gru4):
        carry_T, y = module.apply(params, carry, x, resets, aux)
        grads = jax.grad(loss(module), argnums=(0, 1))(params, x)
        if module is gru:
            ref = (carry_T, y, grads)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves((carry_T, y, grads)), strict=True):
        # Not bitwise: XLA fuses the unrolled body differently (1-ulp float32 differences seen)
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 4 * np.finfo(np.float32).eps * np.max(np.abs(a))


@pytest.mark.parametrize("method", METHODS)
def test_shm_overflowed_memory_is_forgotten_at_a_reset(method, inputs):
    """An inf carried memory must not leak NaN past a reset (a select, not a product 0 · inf)."""
    x, _ = inputs
    s = 6
    resets = jnp.zeros((T, B), bool).at[s].set(True)
    module = SHM(size=H, method=method)
    aux = module.sample_aux(jax.random.PRNGKey(0), (T, B))
    carry = jnp.full((B, H, H), jnp.inf)
    params = module.init(jax.random.PRNGKey(1), module.initialize_carry((B,)), x, resets, aux)
    M_last, y = module.apply(params, carry, x, resets, aux)
    _, y2 = module.apply(params, module.initialize_carry((B,)), x[s:], resets[s:], aux[s:])
    assert np.all(np.isfinite(np.asarray(M_last)))
    np.testing.assert_allclose(np.asarray(y[s:]), np.asarray(y2), rtol=1e-5, atol=1e-6)
