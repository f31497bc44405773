"""The paper's baseline memories (FFM, mLSTM, S6, FWP, attention): each against a float64 numpy
loop written from its equations; one long call equals T calls of one step; a reset forgets all
before it; vmap equals the batched call; gradients equal finite differences; the two memorax bugs
(FFM's time index restarting every call, Mamba's conv state not carried) are caught."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shm_jax
from shm_jax import ffm as ffm_module
from shm_jax import make_memory
from shm_jax import s6 as s6_module
from shm_jax.attention import AttentionCarry
from shm_jax.mlstm import M_START, MLSTMCarry, mlstm_step

T, B, D_IN, SIZE, OUT = 10, 2, 3, 4, 5
# tiny, and each exercising its structure: 2 mLSTM heads, a window shorter than T
KWARGS = {
    "ffm": {"context": 3, "max_period": 16.0},
    "mlstm": {"num_heads": 2},
    "s6": {"state_size": 3},
    "fwp": {},
    "attention": {"window": 3},
}
NAMES = list(KWARGS)
RESET_AT = 4  # every env starts an episode here in the reset test


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.PRNGKey(0), (T, B, D_IN))
    resets = jnp.zeros((T, B), bool).at[3, 0].set(True).at[6, 1].set(True).at[7, 0].set(True)
    return x, resets


def random_carry(module, seed, batch_shape=(B,)):
    """A random, well-formed carry: normal floats (complex: both parts), random flags and step
    counts; attention keys and values are zero in the slots that are not valid. (numpy draws:
    no compile per shape.)"""
    rng = np.random.default_rng(seed)

    def draw(a):
        if a.dtype == bool:
            return rng.random(a.shape) < 0.6
        if jnp.issubdtype(a.dtype, jnp.integer):
            return rng.integers(0, 20, a.shape)
        if jnp.issubdtype(a.dtype, jnp.complexfloating):
            return rng.normal(size=a.shape) + 1j * rng.normal(size=a.shape)
        return rng.normal(size=a.shape)

    carry = module.initialize_carry(batch_shape)
    carry = jax.tree.map(lambda a: jnp.asarray(draw(a), a.dtype), carry)
    if isinstance(carry, AttentionCarry):
        drop = lambda a: jnp.where(carry.valid[..., None, None], a, 0.0)
        carry = carry._replace(keys=drop(carry.keys), values=drop(carry.values))
    return carry


@functools.cache
def _setup(name, extra):
    module = make_memory(name, size=SIZE, features=OUT, **{**KWARGS[name], **dict(extra)})
    x = jnp.zeros((1, B, D_IN))  # the params do not depend on T; one step inits fastest
    params = jax.jit(module.init)(jax.random.PRNGKey(1), module.initialize_carry((B,)), x)
    return module, params, jax.jit(module.apply)


def setup(name, **extra):
    """(module, params, jitted apply) in float32, built once per memory for the whole file."""
    return _setup(name, tuple(sorted(extra.items())))


def in_float64(name, params, **extra):
    """The memory with dtype float64 and `params` cast to it (call under jax.enable_x64)."""
    module = make_memory(
        name, size=SIZE, features=OUT, dtype=jnp.float64, **{**KWARGS[name], **extra}
    )
    return module, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)


# ---------------------------------------------------------------- float64 numpy references


def f64(tree):
    return jax.tree.map(
        lambda a: np.asarray(a, np.complex128 if np.iscomplexobj(a) else np.float64), tree
    )


def dense(p, x):
    return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def layer_norm(a, p=None):
    a = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-6)
    return a if p is None else a * p["scale"] + p["bias"]


def numpy_ffm(P, S, x, resets, module):
    alpha = np.clip(P["alpha"], np.log(np.finfo(np.float64).tiny), -1e-8)
    gamma = np.exp(alpha[:, None] + 1j * P["omega"][None, :])  # [m, c]
    ys = []
    for t in range(x.shape[0]):
        xt = x[t]
        x_tilde = dense(P["proj"], xt) * sigmoid(dense(P["in_gate"], xt))
        S = np.where(resets[t][:, None, None], 0, S)
        S = gamma * S + x_tilde[:, :, None]
        flat = S.reshape(S.shape[0], -1)
        z = layer_norm(dense(P["mix"], np.concatenate([flat.real, flat.imag], -1)))
        g = sigmoid(dense(P["gate"], xt))
        ys.append(z * g + dense(P["skip"], xt) * (1 - g))
    return np.stack(ys), S


def numpy_mlstm(P, carry, x, resets, module):
    """The stabilised mLSTM with the exact start m = -inf (the module uses -1e30)."""
    h, d = module.num_heads, module.size // module.num_heads
    C, n, m = (np.array(a) for a in carry)
    ys = []
    for t in range(x.shape[0]):
        xt, r = x[t], resets[t]
        q = dense(P["query"], xt).reshape(-1, h, d)
        k = dense(P["key"], xt).reshape(-1, h, d) / np.sqrt(d)
        v = dense(P["value"], xt).reshape(-1, h, d)
        i_pre, f_pre = dense(P["input_gate"], xt), dense(P["forget_gate"], xt)
        o = sigmoid(dense(P["output_gate"], xt))
        C = np.where(r[:, None, None, None], 0, C)
        n = np.where(r[:, None, None], 0, n)
        m = np.where(r[:, None], -np.inf, m)
        log_f = -np.logaddexp(0, -f_pre)
        m_new = np.maximum(log_f + m, i_pre)
        i_gate, f_gate = np.exp(i_pre - m_new), np.exp(log_f + m - m_new)
        C = f_gate[..., None, None] * C + i_gate[..., None, None] * np.einsum("bhi,bhj->bhij", v, k)
        n = f_gate[..., None] * n + i_gate[..., None] * k
        m = m_new
        num = np.einsum("bhij,bhj->bhi", C, q)
        den = np.maximum(np.abs(np.einsum("bhi,bhi->bh", n, q)), np.exp(-m))
        ys.append(dense(P["out"], o * (num / den[..., None]).reshape(-1, h * d)))
    return np.stack(ys), (C, n, m)


def numpy_s6(P, carry, x, resets, module):
    softplus = lambda a: np.logaddexp(0, a)
    silu = lambda a: a * sigmoid(a)
    h, history = np.array(carry[0]), None if carry[1] is None else np.array(carry[1])
    A = -np.exp(P["A_log"])
    K = module.conv_width
    ys = []
    for t in range(x.shape[0]):
        xt, r = x[t], resets[t]
        if module.block:
            u, z = np.split(dense(P["in_proj"], xt), 2, axis=-1)
            history = np.where(r[:, None, None], 0, history)
            window = np.concatenate([history, u[:, None]], axis=1)  # [B, K, D], oldest first
            conv = P["conv_bias"] + sum(
                P["conv_kernel"][j] * window[:, K - 1 - j] for j in range(K)
            )
            history = window[:, 1:]
            u = silu(conv)
        else:
            u = dense(P["in_proj"], xt)
        delta = softplus(dense(P["dt_proj"], u))
        Bt, Ct = u @ P["B_proj"]["kernel"], u @ P["C_proj"]["kernel"]
        h = np.where(r[:, None, None], 0, h)
        h = np.exp(delta[..., None] * A) * h + (delta * u)[..., None] * Bt[:, None, :]
        y = np.einsum("bdn,bn->bd", h, Ct) + P["D"] * u
        if module.block:
            y = y * silu(z)
        ys.append(dense(P["out_proj"], y))
    return np.stack(ys), (h, history)


def numpy_fwp(P, M, x, resets, module):
    normalise = lambda a: np.maximum(a, 0) / (1e-5 + np.maximum(a, 0).sum(-1, keepdims=True))
    M = np.array(M)
    ys = []
    for t in range(x.shape[0]):
        xt = x[t]
        k, q = normalise(dense(P["key"], xt)), normalise(dense(P["query"], xt))
        v, beta = dense(P["value"], xt), sigmoid(dense(P["beta"], xt))[:, 0]
        M = np.where(resets[t][:, None, None], 0, M)
        M = M + beta[:, None, None] * np.einsum("bi,bj->bij", v - np.einsum("bij,bj->bi", M, k), k)
        ys.append(dense(P["out"], np.einsum("bij,bj->bi", M, q)))
    return np.stack(ys), M


def numpy_attention(P, carry, x, resets, module):
    """A cache of W slots shifted by one per step (newest last), emptied at a reset."""
    D, h = module.size, module.heads
    dh = D // h
    keys, values, valid, steps = (np.array(a) for a in carry)
    valid, steps = valid.astype(bool), steps.astype(np.int64)
    gelu = lambda a: 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
    i = np.arange(D)
    freq = 10000.0 ** (-(2 * (i // 2)) / D)
    ys = []
    for t in range(x.shape[0]):
        r = resets[t]
        keys[r], values[r], valid[r], steps[r] = 0.0, 0.0, False, 0
        angle = steps[:, None] * freq
        e = dense(P["embed"], x[t]) + np.where(i % 2 == 0, np.sin(angle), np.cos(angle))
        e_norm = layer_norm(e, P["ln_1"])
        q, k, v = (dense(P[n], e_norm).reshape(-1, h, dh) for n in ("query", "key", "value"))
        attended = np.zeros_like(q)
        for b in range(x.shape[1]):
            ks = np.concatenate([keys[b][valid[b]], k[b][None]])  # [j, h, dh]
            vs = np.concatenate([values[b][valid[b]], v[b][None]])
            scores = np.einsum("hd,jhd->hj", q[b], ks) / np.sqrt(dh)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            attended[b] = np.einsum("hj,jhd->hd", w / w.sum(-1, keepdims=True), vs)
        a = e + dense(P["attn_out"], attended.reshape(-1, D))
        z = a + dense(P["mlp_out"], gelu(dense(P["mlp_in"], layer_norm(a, P["ln_2"]))))
        ys.append(dense(P["out"], layer_norm(z, P["ln_f"])))
        if module.window:
            keys = np.concatenate([keys[:, 1:], k[:, None]], 1)
            values = np.concatenate([values[:, 1:], v[:, None]], 1)
            valid = np.concatenate([valid[:, 1:], np.ones((x.shape[1], 1), bool)], 1)
        steps = steps + 1
    return np.stack(ys), (keys, values, valid, steps)


REFERENCES = {
    "ffm": numpy_ffm,
    "mlstm": numpy_mlstm,
    "s6": numpy_s6,
    "fwp": numpy_fwp,
    "attention": numpy_attention,
}


@pytest.mark.parametrize(
    "name, extra",
    [(n, {}) for n in NAMES] + [("s6", {"block": False}), ("mlstm", {"num_heads": 1})],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()),
)
def test_matches_numpy_reference(name, extra, inputs):
    """Outputs and final carry against the float64 numpy loop, from a random carried-in state,
    with episode starts inside the sequence."""
    x, resets = inputs
    with jax.enable_x64(True):
        module, params = in_float64(name, setup(name, **extra)[1], **extra)
        carry = random_carry(module, 2)
        xd = jnp.asarray(x, jnp.float64)
        carry_T, y = jax.jit(module.apply)(params, carry, xd, resets, None)
    ref_y, ref_carry = REFERENCES[name](
        f64(params["params"]), f64(carry), f64(xd), np.asarray(resets), module
    )
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-8, atol=1e-10)
    chex.assert_trees_all_close(leaves(carry_T), leaves(ref_carry), rtol=1e-8, atol=1e-10)


def leaves(tree) -> list[np.ndarray]:
    """The carry's arrays in order, flags and counts as floats (numpy and JAX carries compare)."""
    return [np.asarray(a).astype(np.result_type(a, np.float64)) for a in jax.tree.leaves(tree)]


def largest_gap(a, b) -> float:
    return max(
        float(np.abs(u - v).max(initial=0.0)) for u, v in zip(leaves(a), leaves(b), strict=True)
    )


def step_by_step_gap(apply, params, carry, x, resets) -> float:
    """The largest difference between one call over x [T, ...] and T calls of one step carrying
    the state, over the outputs and the final carry."""
    carry_T, y = apply(params, carry, x, resets, None)
    c, ys = carry, []
    for t in range(x.shape[0]):
        c, yt = apply(params, c, x[t : t + 1], resets[t : t + 1], None)
        ys.append(yt)
    return largest_gap((np.concatenate(ys), c), (y, carry_T))


@pytest.mark.parametrize("name", NAMES)
def test_one_call_equals_steps_of_one(name, inputs):
    x, resets = inputs
    module, params, apply = setup(name)
    carry = random_carry(module, 4)
    assert step_by_step_gap(apply, params, carry, x, resets) < 2e-5


def reset_gap(apply, params, module, x):
    """(largest change of outputs from RESET_AT on and of the final carry, smallest change before
    it) when the inputs before RESET_AT and the carried-in state are replaced."""
    resets = jnp.zeros((T, B), bool).at[RESET_AT].set(True).at[7, 1].set(True)
    x2 = x.at[:RESET_AT].set(jax.random.normal(jax.random.PRNGKey(5), (RESET_AT, B, D_IN)))
    c1, y1 = apply(params, random_carry(module, 6), x, resets, None)
    c2, y2 = apply(params, random_carry(module, 7), x2, resets, None)
    after = largest_gap((y1[RESET_AT:], c1), (y2[RESET_AT:], c2))
    before = np.abs(y1[:RESET_AT] - y2[:RESET_AT]).max(axis=(1, 2)).min()
    return after, float(before)


@pytest.mark.parametrize("name", NAMES)
def test_a_reset_forgets_everything_before_it(name, inputs):
    x, _ = inputs
    module, params, apply = setup(name)
    after, before = reset_gap(apply, params, module, x)
    assert after < 1e-6
    assert before > 1e-4  # and the replaced inputs and state did matter before the reset


@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_the_batched_call(name, inputs):
    """A vmap over an extra batch axis E gives the numbers of one call with batch shape (E, B)."""
    x, resets = inputs
    module, params, apply = setup(name)
    E = 2
    xe = jnp.stack([x, x[::-1]], axis=1)  # [T, E, B, d]
    re = jnp.stack([resets, resets[::-1]], axis=1)
    carry = random_carry(module, 8, (E, B))
    batched = apply(params, carry, xe, re, None)
    mapped = jax.jit(jax.vmap(module.apply, in_axes=(None, 0, 1, 1, None), out_axes=(0, 1)))(
        params, carry, xe, re, None
    )
    chex.assert_trees_all_close(mapped, batched, rtol=1e-5, atol=1e-6)


def assert_central_differences(f, value, grad, rng, exclude=(), eps=1e-6):
    """grad [value's shape] equals the central differences of f (array -> float) at `value` in 4
    random coordinates (not those in `exclude`)."""
    flat = np.asarray(value, np.float64).ravel()
    candidates = np.setdiff1d(np.arange(flat.size), exclude)
    for i in rng.choice(candidates, size=min(4, candidates.size), replace=False):
        bump = np.zeros_like(flat)
        bump[i] = eps
        up, down = (f(jnp.asarray((flat + s * bump).reshape(np.shape(value)))) for s in (1, -1))
        np.testing.assert_allclose(np.ravel(grad)[i], (up - down) / (2 * eps), rtol=1e-6, atol=1e-8)


def with_leaf(tree, path, value):
    """`tree` (nested dicts) with the leaf at `path` replaced."""
    if not path:
        return value
    return {**tree, path[0]: with_leaf(tree[path[0]], path[1:], value)}


@pytest.mark.parametrize(
    "name, param_paths",
    [
        ("ffm", [("alpha",), ("omega",), ("proj", "kernel")]),
        ("mlstm", [("forget_gate", "bias"), ("input_gate", "kernel"), ("query", "kernel")]),
    ],
)
def test_gradients_match_finite_differences(name, param_paths, inputs):
    """d loss / d(x, some params) against central differences in float64, for a diagonal-scan
    memory (FFM) and a sequential one (mLSTM, through its stabiliser's max); from the start
    carry (the mLSTM's m = M_START) every gradient is finite."""
    x, resets = inputs
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        module, params = in_float64(name, setup(name)[1])
        carry = random_carry(module, 9)
        xd = jnp.asarray(x, jnp.float64)
        weights = jax.random.normal(jax.random.PRNGKey(11), (T, B, OUT), jnp.float64)

        @jax.jit
        def loss(params, x, carry):
            return jnp.sum(jnp.sin(module.apply(params, carry, x, resets, None)[1]) * weights)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        g_params, g_x = grad(params, xd, carry)
        assert_central_differences(lambda v: loss(params, v, carry), xd, g_x, rng)
        for path in param_paths:
            path = ("params", *path)
            value = functools.reduce(lambda node, key: node[key], path, params)
            g = functools.reduce(lambda node, key: node[key], path, g_params)
            # FFM's alpha[0] = -1e-6 starts next to the clip at -1e-8: not a smooth point
            exclude = (0,) if path[-1] == "alpha" else ()
            f = lambda v, path=path: loss(with_leaf(params, path, v), xd, carry)
            assert_central_differences(f, value, g, rng, exclude)
        g_start = grad(params, xd, module.initialize_carry((B,)))
        assert all(np.all(np.isfinite(a)) for a in leaves(g_start))


def test_mlstm_first_step_after_a_reset():
    """m_1 = ĩ_1 exactly whatever the carried state, with finite values and gradients (also
    from the start value M_START itself)."""
    rng = np.random.default_rng(12)
    q, k, v = (jnp.asarray(rng.normal(size=(B, 2, 3)), jnp.float32) for _ in range(3))
    i_pre, f_pre = (jnp.asarray(3 * rng.normal(size=(B, 2)), jnp.float32) for _ in range(2))
    garbage = MLSTMCarry(
        jnp.full((B, 2, 3, 3), 1e3), jnp.full((B, 2, 3), -7.0), jnp.full((B, 2), 50.0)
    )
    start = MLSTMCarry(jnp.zeros((B, 2, 3, 3)), jnp.zeros((B, 2, 3)), jnp.full((B, 2), M_START))

    def total(carry, xs, resets):
        new, h = mlstm_step(carry, (*xs, resets))
        return jnp.sum(h) + jnp.sum(new.m) + jnp.sum(new.C)

    step, grad = jax.jit(mlstm_step), jax.jit(jax.grad(total, argnums=(0, 1)))
    for carry, reset in ((garbage, True), (start, False)):
        resets = jnp.full((B,), reset)
        new, h = step(carry, (q, k, v, i_pre, f_pre, resets))
        np.testing.assert_array_equal(np.asarray(new.m), np.asarray(i_pre))
        np.testing.assert_allclose(np.asarray(new.n), np.asarray(k), rtol=1e-6)  # i' = 1, f' = 0
        grads = grad(carry, (q, k, v, i_pre, f_pre), resets)
        assert all(np.all(np.isfinite(a)) for a in leaves((h, grads)))


# ---------------------------------------------------------------- memorax's bugs, planted


def test_ffm_decays_a_carried_state_on_a_single_step_call(inputs, monkeypatch):
    """memorax's FFMCell restarts its time index every call, so a carried state enters a call
    undecayed (γ⁰ where γ¹ is due): a call of one step never forgets. Planting that bug (the
    carried S divided by γ before the scan multiplies it by γ) makes the step-by-step test fail."""
    x, resets = inputs
    module, params, _ = setup("ffm")
    carry = random_carry(module, 4)
    real = ffm_module.ffm_states
    monkeypatch.setattr(ffm_module, "ffm_states", lambda g, xt, r, S: real(g, xt, r, S / g))
    buggy = jax.jit(lambda *a: module.apply(*a))  # a fresh trace, with the bug
    assert step_by_step_gap(buggy, params, carry, x, resets) > 1e-2


def test_s6_conv_state_is_carried_and_reset(inputs, monkeypatch):
    """memorax's Mamba neither carries its conv inputs across calls nor clears them at an
    episode start. Planting either bug makes the matching test fail: a conv that starts every
    call from zeros breaks step-by-step equality, one that ignores resets leaks the last
    episode's inputs past a reset."""
    x, resets = inputs
    module, params, _ = setup("s6")
    carry = random_carry(module, 4)
    real = s6_module.causal_conv
    with monkeypatch.context() as patch:
        patch.setattr(
            s6_module,
            "causal_conv",
            lambda u, r, hist, k, b: real(u, r, jnp.zeros_like(hist), k, b),
        )
        not_carried = jax.jit(lambda *a: module.apply(*a))
        assert step_by_step_gap(not_carried, params, carry, x, resets) > 1e-3
    with monkeypatch.context() as patch:
        patch.setattr(
            s6_module,
            "causal_conv",
            lambda u, r, hist, k, b: real(u, jnp.zeros_like(r), hist, k, b),
        )
        not_reset = jax.jit(lambda *a: module.apply(*a))
        assert reset_gap(not_reset, params, module, x)[0] > 1e-3


# ---------------------------------------------------------------- the registry and the errors


def test_registry_and_exports():
    classes = {
        "ffm": shm_jax.FFM,
        "mlstm": shm_jax.MLSTM,
        "s6": shm_jax.S6,
        "fwp": shm_jax.FWP,
        "attention": shm_jax.Attention,
    }
    for name, cls in classes.items():
        assert name in shm_jax.memory_names
        module = make_memory(name, size=8)
        assert isinstance(module, cls) and module.size == 8
        assert f"- {name}:" in make_memory.__doc__  # the docstring says what `size` means
    assert make_memory("attention", size=8).heads == 4
    assert make_memory("attention", size=6).heads == 3
    assert make_memory("attention", size=5).heads == 1


@pytest.mark.parametrize("name", NAMES)
def test_wrong_shapes_raise_one_line_errors(name, inputs):
    x, resets = inputs
    module = make_memory(name, size=SIZE, **KWARGS[name])
    carry = module.initialize_carry((B,))
    key = jax.random.PRNGKey(0)
    cases = [
        ((carry, x[0], resets[0]), r"x must be time-major \[T, \*batch, d\]"),
        ((carry, x, resets[:, :1]), r"resets must be \[T, \*batch\] = \(10, 2\)"),
        (
            (module.initialize_carry((B + 1,)), x, resets),
            r"carry must have shapes .* initialize_carry",
        ),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            module.init(key, *args, None)
        assert "\n" not in str(err.value)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="MLSTM: size must be a positive multiple of num_heads"):
        shm_jax.MLSTM(size=6, num_heads=4)
    with pytest.raises(ValueError, match="Attention: num_heads must divide size"):
        shm_jax.Attention(size=6, num_heads=4)
    with pytest.raises(ValueError, match="FFM: periods need 0 < min_period <= max_period"):
        shm_jax.FFM(size=4, min_period=0.0)
    with pytest.raises(ValueError, match="S6: size, state_size and conv_width must be >= 1"):
        shm_jax.S6(size=4, state_size=0)
    with pytest.raises(ValueError, match="FWP: size must be >= 1"):
        shm_jax.FWP(size=0)


def test_state_sizes_match_the_docstrings():
    """Floats per env (complex counts twice), as the docstrings and the README state them."""
    floats = lambda m: sum(
        a.size * (2 if jnp.iscomplexobj(a) else 1) for a in jax.tree.leaves(m.initialize_carry(()))
    )
    H = 8
    assert floats(shm_jax.FFM(size=H)) == 2 * H * 4
    assert floats(shm_jax.MLSTM(size=H, num_heads=2)) == H * H // 2 + H + 2
    assert floats(shm_jax.S6(size=H)) == H * 16 + 3 * H
    assert floats(shm_jax.S6(size=H, block=False)) == H * 16
    assert floats(shm_jax.FWP(size=H)) == H * H
    assert floats(shm_jax.Attention(size=H)) == 2 * 64 * H + 64 + 1
    assert math.isclose(2 * 64 * 128, 128**2)  # the window's justification: SHM's H² at H = 128
