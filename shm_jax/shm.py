"""The Stable Hadamard Memory layer (Le et al., ICLR 2025; `shared/spec/shm.md`).

One step, input x_t (width d), memory M_{t-1} (H×H), learned bank Θ [L, H]:

    x̂ = LayerNorm(x);  k = relu(W_k x̂) / (1e-5 + Σ relu(W_k x̂));  q likewise with W_q
    v = W_v x̂;  η = sigmoid(w_η · x̂);  c = W_c x̂;  θ = Θ[i_t], i_t ~ U{0..L-1}
    C = 1 + tanh(θ cᵀ);  U = η v kᵀ;  M_t = C ⊙ M_{t-1} + U          (the Hadamard recurrence)
    y = M_t q + (W_s x̂ + b_s);  out = W_o y + b_o

The θ indices are the layer's `aux` input: the caller draws them with `sample_aux` while acting,
stores them, and hands the same ones back in the PPO update, so the update recomputes exactly the
memory the agent acted with (the authors' RLlib code re-draws them: spec, "disagree" item 3).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from shm_jax import native
from shm_jax.kernel import fused_read, pallas_read
from shm_jax.native import native_read
from shm_jax.scan import DEFAULT_CHUNK, METHODS, choose_method, hadamard_read, hadamard_scan

CALIBRATIONS = ("shm", "none", "fixed", "single_theta")
CALIBRATED = ("shm", "single_theta")  # C_t = 1 + tanh(θ_t c_tᵀ)


def layer_method(T: int, batch: int, H: int, *, fused: bool, backend: str | None = None) -> str:
    """The form the SHM layer's method="auto" runs for T steps of `batch` sequences of H×H
    memories. `fused`: C_t = 1 + tanh(θ_t c_tᵀ) with no clamp, so the memory can be computed
    from [T, B, H] vectors (`shm_jax.kernel`). On a GPU that is the Pallas kernel, which trains
    the layer faster than the associative scan, the fastest other form, in a fraction of its
    memory (docs/performance.md). On a CPU it is the C++ kernel (`shm_jax.native`) when it
    builds, faster to train than `fused_read`, which runs otherwise (with a warning). Otherwise
    `choose_method`: "sequential" on a CPU, the associative scan on a GPU/TPU while it fits its
    memory budget."""
    backend = backend or jax.default_backend()
    if fused and backend == "gpu":
        return "pallas"
    if fused and backend == "cpu":
        if native.available():
            return "native"
        native.warn_fallback()
    return choose_method(T, batch, H, backend)


LAYER_METHODS = (*METHODS, "pallas", "pallas_pipelined", "native")
FUSED_ONLY = ("pallas", "pallas_pipelined", "native")  # forms that need θ calibration, no clamp
PALLAS_METHODS = ("pallas", "pallas_pipelined")
# The fused forms by method name: the Pallas kernel's pipelined variant is opt-in until measured.
FUSED_READS = {
    "sequential": fused_read,
    "pallas": pallas_read,
    "pallas_pipelined": functools.partial(pallas_read, pipelined=True),
    "native": native_read,
}


@functools.cache
def warn_interpreted(method: str, faster: str) -> None:
    """Once per process and method: say that a Pallas method on a CPU runs the kernel in Pallas'
    interpreter, several times slower to train than `faster`, what "auto" runs there."""
    warnings.warn(
        f"shm_jax: SHM method {method!r} runs the Pallas kernel in its interpreter on a CPU, "
        f"several times slower to train than method='auto' (= {faster!r} here, the same "
        "numbers); use method='auto' unless you are testing the kernel",
        RuntimeWarning,
        stacklevel=3,
    )


THETA_INITS = ("xavier", "xavier_abs")
CALIB_INITS = ("lecun", "zeros")


def factored_read(theta, c, eta_v, k, q, resets, memory, chunk: int = DEFAULT_CHUNK):
    """Y_t = M_t q_t for M_t = (1 + tanh(θ_t c_tᵀ)) ⊙ M_{t-1} + (η_t v_t) k_tᵀ, sequentially.

    All inputs [T, *batch, H] (resets [T, *batch], memory [*batch, H, H]). C_t and U_t are formed
    inside the step, and each chunk of `chunk` steps is rematerialised in the backward pass, so
    memory stays O(T·B·H + (T/chunk)·B·H²). Returns (Y [T, *batch, H], M_last).

    The layer runs `shm_jax.kernel.fused_read` instead (same numbers, hand-written backward, 3x
    faster fwd+bwd on CPU); this plain-autodiff version is its reference in the tests and the
    one to use for forward-mode differentiation."""
    T = theta.shape[0]
    n = math.ceil(T / chunk) if T > chunk else 1
    size = T if n == 1 else chunk
    pad = n * size - T
    # zero padding is an identity step: tanh(0) = 0 gives C = 1, and η v = 0 gives U = 0
    xs = tuple(
        jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a
        for a in (theta, c, eta_v, k, q, resets)
    )
    xs = tuple(a.reshape(n, size, *a.shape[1:]) for a in xs)

    def step(M, x):
        th, ct, ev, kt, qt, r = x
        M = jnp.where(r[..., None, None], 0.0, M)
        M = (1 + jnp.tanh(th[..., :, None] * ct[..., None, :])) * M + ev[..., :, None] * kt[
            ..., None, :
        ]
        return M, jnp.einsum("...ij,...j->...i", M, qt)

    M_last, Y = jax.lax.scan(jax.checkpoint(lambda M, x: jax.lax.scan(step, M, x)), memory, xs)
    return Y.reshape(n * size, *Y.shape[2:])[:T], M_last


def clamped_scan(C, U, resets, memory, clamp: float):
    """Every M_t [T, *batch, H, H] of M_t = clip(C_t ⊙ M_{t-1} + U_t, -clamp, clamp), M_{t-1}
    zeroed where resets [T, *batch] starts an episode; memory [*batch, H, H] is M_{-1}. The clip
    breaks associativity, so this is a sequential scan (the layer's `clamp`)."""

    def step(M, inputs):
        c, u, r = inputs
        M = jnp.where(r[..., None, None], 0.0, M)
        M = jnp.clip(c * M + u, -clamp, clamp)
        return M, M

    return jax.lax.scan(step, memory, (C, U, resets))[1]


class SHM(nn.Module):
    """Stable Hadamard Memory, time-major: `__call__(carry, x, resets, aux) -> (carry, y)`.

    Attributes:
      size: memory size H (M is H×H).
      features: output width (defaults to `size`).
      num_thetas: L, rows of the calibration bank Θ (128 in the paper).
      theta_init: "xavier" (Xavier-uniform, the paper's) or "xavier_abs" (its absolute value:
        every row starts with the same signs, so the sign of θ_t[i]·c_t[j] is set by the learned
        c_t rather than by which row was drawn; the model is unchanged, only its start).
      calib_init: the calibration projection W_c (c_t = W_c x̂_t): "lecun" (flax's default
        LeCun-normal) or "zeros" (c_t = 0 at the start, so every C_t = 1 and the memory starts
        by accumulating; W_c still gets the gradient Σ_i θ_t[i] ∂L/∂C_t[i, j] from the first
        step). With "xavier_abs" it gives every row shared signs without the geometric growth
        of a column whose c_t[j] stays positive. Only for θ calibration.
      calibration: "shm" (C = 1 + tanh(θ_t c_tᵀ), θ_t a random row per step; the paper),
        "none" (C = 1: memory only accumulates), "fixed" (C = a learned input-independent H×H
        matrix: the paper's Prop. 3 design), "single_theta" (always Θ[0]: what the authors'
        POPGym code does in effect).
      clamp: if set, clip M to [-clamp, clamp] after every step (the authors' pomdp-baselines
        code uses 100); this breaks associativity, so the sequential form runs. Off by default.
      method: "auto" | "sequential" | "associative" | "chunked" (the forms of `shm_jax.scan`;
        with θ calibration and no clamp, "sequential" is `shm_jax.kernel.fused_read`, which
        never forms C, U [T, B, H, H] and has a hand-written backward) | "pallas" (the Pallas
        kernel `shm_jax.kernel.pallas_read`, for a GPU; interpreted, slowly, on a CPU; needs θ
        calibration and no clamp; on a CPU it warns once, naming the faster choice) |
        "pallas_pipelined" (the same kernel loading whole chunks one chunk ahead:
        `pallas_read(..., pipelined=True)`; opt-in until timed on a GPU) | "native" (the C++
        CPU kernel `shm_jax.native.native_read`, built on first use; same needs). "auto" =
        `layer_method`: "pallas" on a GPU and "native" on a CPU wherever they apply (each
        measured faster than every other form there: docs/performance.md), else
        `shm_jax.scan.choose_method`.
      dtype: parameter and computation dtype.
    """

    size: int
    features: int | None = None
    num_thetas: int = 128
    theta_init: str = "xavier"
    calib_init: str = "lecun"
    calibration: str = "shm"
    clamp: float | None = None
    method: str = "auto"
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"unknown calibration {self.calibration!r}; choose one of {', '.join(CALIBRATIONS)}"
            )
        if self.theta_init not in THETA_INITS:
            raise ValueError(
                f"unknown theta_init {self.theta_init!r}; choose one of {', '.join(THETA_INITS)}"
            )
        if self.calib_init not in CALIB_INITS:
            raise ValueError(
                f"unknown calib_init {self.calib_init!r}; choose one of {', '.join(CALIB_INITS)}"
            )
        if self.calib_init != "lecun" and self.calibration not in CALIBRATED:
            raise ValueError(
                f"calib_init={self.calib_init!r} sets W_c, which calibration "
                f"{self.calibration!r} does not have; it needs calibration in {CALIBRATED}"
            )
        if self.method not in LAYER_METHODS:
            raise ValueError(
                f"unknown method {self.method!r}; choose one of {', '.join(LAYER_METHODS)}"
            )
        if self.method in FUSED_ONLY and (
            self.calibration not in CALIBRATED or self.clamp is not None
        ):
            raise ValueError(
                f"method {self.method!r} computes C_t = 1 + tanh(θ_t c_tᵀ) without a clamp: it "
                f"needs calibration in {CALIBRATED} and clamp=None; got {self.calibration!r}, "
                f"clamp={self.clamp!r}"
            )
        if self.method == "native" and not native.available():
            raise ValueError(
                f"method 'native' needs the C++ CPU kernel, which did not build "
                f"({native.unavailable_reason()}); use method='sequential' (same numbers)"
            )
        if self.size < 1 or self.num_thetas < 1:
            raise ValueError(
                f"size and num_thetas must be >= 1; got {self.size}, {self.num_thetas}"
            )
        super().__post_init__()

    def initialize_carry(self, batch_shape: tuple[int, ...]) -> jax.Array:
        """Zero memory M: [*batch_shape, H, H]."""
        return jnp.zeros((*batch_shape, self.size, self.size), self.dtype)

    def sample_aux(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """θ-row indices i_t ~ U{0..L-1}, int32 of `shape` (zeros for "single_theta")."""
        if self.calibration == "single_theta":
            return jnp.zeros(shape, jnp.int32)
        return jax.random.randint(key, shape, 0, self.num_thetas, dtype=jnp.int32)

    def setup(self):
        H = self.size
        dense = lambda n, bias=False: nn.Dense(
            n, use_bias=bias, dtype=self.dtype, param_dtype=self.dtype
        )
        self.norm = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype)
        self.key_proj, self.query_proj, self.value_proj = dense(H), dense(H), dense(H)
        self.eta_proj = dense(1)
        self.shortcut = dense(H, bias=True)
        self.out_proj = nn.Dense(self.features or H, dtype=self.dtype, param_dtype=self.dtype)
        if self.calibration == "fixed":
            self.fixed_calibration = self.param(
                "fixed_calibration",
                lambda key, shape: (
                    jnp.ones(shape, self.dtype)
                    + jax.random.uniform(key, shape, self.dtype, -0.05, 0.05)
                ),
                (H, H),
            )
        elif self.calibration != "none":
            xavier = nn.initializers.xavier_uniform()
            init = xavier if self.theta_init == "xavier" else lambda *a: jnp.abs(xavier(*a))
            self.theta = self.param("theta", init, (self.num_thetas, H), self.dtype)
            self.calib_proj = nn.Dense(
                H,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.dtype,
                **({"kernel_init": nn.initializers.zeros} if self.calib_init == "zeros" else {}),
            )

    def _vectors(self, x, aux):
        """The per-step vectors, each [T, B, H]: θ_t, c_t (None unless calibrated by θ), η_t v_t,
        k_t, q_t, and the shortcut W_s x̂ + b_s."""
        xh = self.norm(x)
        k = nn.relu(self.key_proj(xh))
        k = k / (1e-5 + k.sum(-1, keepdims=True))
        q = nn.relu(self.query_proj(xh))
        q = q / (1e-5 + q.sum(-1, keepdims=True))
        eta_v = nn.sigmoid(self.eta_proj(xh)) * self.value_proj(xh)
        theta = c = None
        if self.calibration in ("shm", "single_theta"):
            theta, c = self.theta[aux], self.calib_proj(xh)
        return theta, c, eta_v, k, q, self.shortcut(xh)

    def _factors(self, x, aux):
        """Per-step C, U [T, B, H, H], query q [T, B, H] and shortcut [T, B, H] from x [T, B, d]."""
        theta, c, eta_v, k, q, shortcut = self._vectors(x, aux)
        U = eta_v[..., :, None] * k[..., None, :]
        if self.calibration == "none":
            C = jnp.ones_like(U)
        elif self.calibration == "fixed":
            C = jnp.broadcast_to(self.fixed_calibration, U.shape)
        else:
            C = 1 + jnp.tanh(theta[..., :, None] * c[..., None, :])
        return C, U, q, shortcut

    def _check_inputs(self, x, resets, aux):
        """resets None means no episode starts; aux None is allowed only where no random θ row is
        needed (every calibration but "shm")."""
        batch = x.shape[1:-1]
        if resets is None:
            resets = jnp.zeros((x.shape[0], *batch), bool)
        if aux is None:
            if self.calibration == "shm":
                raise ValueError(
                    "SHM(calibration='shm') needs aux, the θ row indices [T, *batch] int32: pass "
                    "aux = layer.sample_aux(key, (T, B)) and keep it, so that the update replays "
                    "the θ the agent acted with"
                )
            aux = jnp.zeros((x.shape[0], *batch), jnp.int32)  # Θ[0]: what "single_theta" draws
        return resets, aux

    def __call__(self, carry, x, resets=None, aux=None):
        """carry M [B, H, H]; x [T, B, d]; resets [T, B] bool (None: no episode starts); aux
        [T, B] int32 θ indices from `sample_aux` (may be None unless calibration is "shm").

        Returns (M after the last step [B, H, H], out [T, B, features])."""
        resets, aux = self._check_inputs(x, resets, aux)
        T, H = x.shape[0], self.size
        fused = self.clamp is None and self.calibration in CALIBRATED
        method = self.method
        if method == "auto":
            method = layer_method(T, math.prod(x.shape[1:-1]), H, fused=fused)
        if method == "native" and jax.default_backend() != "cpu":
            raise ValueError(
                f"method 'native' is the CPU kernel; the default backend is "
                f"{jax.default_backend()!r}: use method='auto' (or 'pallas' on a GPU)"
            )
        if method in PALLAS_METHODS and jax.default_backend() == "cpu":
            warn_interpreted(method, layer_method(T, math.prod(x.shape[1:-1]), H, fused=True))
        if fused and method in ("sequential", *FUSED_ONLY):
            # Build C_t and U_t inside the step from [T, B, H] vectors: the same numbers as
            # hadamard_read's sequential form without ever holding C, U [T, B, H, H] in memory,
            # and a hand-written backward pass (shm_jax.kernel), 3x faster than autodiff's.
            theta, c, eta_v, k, q, shortcut = self._vectors(x, aux)
            read, M_last = FUSED_READS[method](theta, c, eta_v, k, q, resets, carry)
            return M_last, self.out_proj(read + shortcut)
        C, U, q, shortcut = self._factors(x, aux)
        if self.clamp is None:
            read, M_last = hadamard_read(C, U, q, resets=resets, memory=carry, method=method)
        else:
            M_all = clamped_scan(C, U, resets, carry, self.clamp)
            read, M_last = jnp.einsum("...ij,...j->...i", M_all, q), M_all[-1]
        return M_last, self.out_proj(read + shortcut)

    def vectors(self, carry, x, resets=None, aux=None):
        """For inspection: the per-step vectors the layer computes from its input, each
        [T, *batch, H]: "x_hat" (LayerNorm(x), [T, *batch, d]), "k" and "q" (the sum-normalised
        key and query), "eta_v" (η_t v_t), and for θ calibration "theta" (the drawn rows θ_t) and
        "c" (c_t). Takes `__call__`'s inputs (carry and resets are not needed, only accepted):
        `layer.apply(params, carry, x, resets, aux, method="vectors")`."""
        del carry
        resets, aux = self._check_inputs(x, resets, aux)
        theta, c, eta_v, k, q, _ = self._vectors(x, aux)
        out = {"x_hat": self.norm(x), "k": k, "q": q, "eta_v": eta_v}
        if theta is not None:
            out.update(theta=theta, c=c)
        return out

    def memory_trace(self, carry, x, resets=None, aux=None):
        """For inspection (notebooks, `train.memory_trace`): the recurrence step by step.

        Takes `__call__`'s inputs and returns {"M", "C", "U"}, each [T, B, H, H]: C_t and U_t of
        M_t = C_t ⊙ M_{t-1} + U_t, and M_t, the memory after step t with the resets applied as
        `__call__` applies them (M_{t-1} is zeroed before a step that starts an episode), so
        M[-1] is `__call__`'s returned carry. C_t is the calibration step t uses; a reset does not
        change it (it zeroes M_{t-1}, not C_t). Call it with the layer's params:
        `layer.apply(params, carry, x, resets, aux, method="memory_trace")`."""
        resets, aux = self._check_inputs(x, resets, aux)
        C, U, _, _ = self._factors(x, aux)
        if self.clamp is None:
            M_all, _ = hadamard_scan(C, U, resets=resets, memory=carry, method="sequential")
        else:
            M_all = clamped_scan(C, U, resets, carry, self.clamp)
        return {"M": M_all, "C": C, "U": U}
