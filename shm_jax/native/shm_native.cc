// The SHM read on a CPU as XLA FFI custom calls: the forward and the hand-written backward of
// `shm_jax/kernel.py` (the module docstring there has the equations), one sequence at a time.
//
// One sequence's memory M (H×H) stays in cache for all its T steps, instead of round-tripping
// through memory at every step of a `lax.scan`. The sequences of a batch are independent; they
// are shared out over XLA's intra-op thread pool, and each is computed whole by one thread, so
// the results do not depend on the number of threads.
//
// Layout: batch-major, every leading dimension a batch dimension (vmap adds one more).
//   theta, c, e, k, q, dy, the gradients: [..., T, H]; resets: [..., T] (bool);
//   M0, M_last, dM_last, dM0: [..., H, H]; starts: [..., ceil(T / chunk), H, H], the memory
//   before the first step of each chunk (M̃ at a reset is applied inside the step, as in
//   kernel.py), or [..., 0, H, H] when the caller needs no checkpoints.
//
// Built by shm_jax/native.py with the system's C++ compiler on first use.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// float32 tanh as XLA's CPU backend computes it (Eigen's rational approximation: clamp to
// ±7.9053111, an odd degree-13 numerator over an even degree-6 denominator, x itself below
// 4e-4), written so the compiler vectorises it; float64 uses std::tanh.
inline float Tanh(float x) {
  const float kClamp = 7.90531110763549805f;
  const float xc = std::min(std::max(x, -kClamp), kClamp);
  const float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  float d = 1.19825839466702e-06f;
  d = d * x2 + 1.18534705686654e-04f;
  d = d * x2 + 2.26843463243900e-03f;
  d = d * x2 + 4.89352518554385e-03f;
  const float r = p / d;
  return std::fabs(x) < 0.0004f ? x : r;
}

inline double Tanh(double x) { return std::tanh(x); }

struct Shape {
  int64_t n;  // sequences (product of the leading dimensions)
  int64_t t;  // steps
  int64_t h;  // memory size
};

// Runs fn(i) for i in [0, n) on the calling thread and the pool's threads. Each i runs whole on
// one thread. Small jobs stay on the calling thread.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t work_per_item, Fn fn) {
  constexpr int64_t kMinParallelWork = int64_t{1} << 17;
  const int64_t parts = std::min<int64_t>(n, std::max<int64_t>(1, pool.num_threads()));
  if (parts <= 1 || n * work_per_item < kMinParallelWork) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t finished = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto worker = [state, n, &fn]() {
    for (int64_t i = state->next.fetch_add(1); i < n; i = state->next.fetch_add(1)) fn(i);
    std::lock_guard<std::mutex> lock(state->mu);
    ++state->finished;
    state->cv.notify_all();
  };
  for (int64_t p = 1; p < parts; ++p) pool.Schedule([worker]() { worker(); });
  worker();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->finished == parts; });
}

// One sequence forward: y [T, H], m_last [H, H]; starts [nc, H, H] or nullptr.
template <typename F>
void ForwardOne(const F* th, const F* c, const F* e, const F* k, const F* q, const bool* r,
                const F* m0, F* y, F* m_last, F* starts, int64_t T, int64_t H, int64_t L) {
  const int64_t HH = H * H;
  std::vector<F> M(m0, m0 + HH);
  for (int64_t t = 0; t < T; ++t) {
    if (starts != nullptr && t % L == 0) std::memcpy(starts + (t / L) * HH, M.data(), HH * sizeof(F));
    const F* ct = c + t * H;
    const F* kt = k + t * H;
    const F* qt = q + t * H;
    // M̃_{t-1} = 0 at an episode start: a fill, never a product with (1 - r), so an
    // overflowed memory cannot leak 0 · inf = NaN into the next episode.
    if (r[t]) std::fill(M.begin(), M.end(), F(0));
    for (int64_t i = 0; i < H; ++i) {
      F* row = M.data() + i * H;
      const F a = th[t * H + i], b = e[t * H + i];
      F acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < H; ++j) {
        const F m = (F(1) + Tanh(a * ct[j])) * row[j] + b * kt[j];
        row[j] = m;
        acc += m * qt[j];
      }
      y[t * H + i] = acc;
    }
  }
  std::memcpy(m_last, M.data(), HH * sizeof(F));
}

// One sequence backward, chunk by chunk from the last: recompute the chunk's M̃_{t-1} and
// tanh(θ_t c_tᵀ) from its checkpoint (and dq_t = M_tᵀ dy_t on the way), then run the reverse
// recurrence over it. The chunk's 2·L·H² numbers stay in cache.
template <typename F>
void BackwardOne(const F* th, const F* c, const F* e, const F* k, const F* q, const bool* r,
                 const F* starts, const F* dy, const F* dm_last, F* dth, F* dc, F* de, F* dk,
                 F* dq, F* dm0, int64_t T, int64_t H, int64_t L) {
  const int64_t HH = H * H;
  const int64_t chunks = (T + L - 1) / L;
  std::vector<F> P(dm_last, dm_last + HH);  // ∂L/∂M_t from the steps after t
  std::vector<F> M(HH);
  std::vector<F> Mp(L * HH);  // M̃_{t-1} for each step of the chunk
  std::vector<F> Th(L * HH);  // tanh(θ_t c_tᵀ) for each step of the chunk
  for (int64_t ci = chunks - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * L, t1 = std::min(T, t0 + L);
    std::memcpy(M.data(), starts + ci * HH, HH * sizeof(F));
    for (int64_t t = t0; t < t1; ++t) {
      F* mp = Mp.data() + (t - t0) * HH;
      F* tht = Th.data() + (t - t0) * HH;
      const F* ct = c + t * H;
      const F* kt = k + t * H;
      F* dqt = dq + t * H;
      if (r[t]) std::fill(M.begin(), M.end(), F(0));
      std::fill(dqt, dqt + H, F(0));
      for (int64_t i = 0; i < H; ++i) {
        F* row = M.data() + i * H;
        F* mprow = mp + i * H;
        F* tanh_row = tht + i * H;
        const F a = th[t * H + i], b = e[t * H + i], g = dy[t * H + i];
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const F prev = row[j];
          const F tt = Tanh(a * ct[j]);
          mprow[j] = prev;
          tanh_row[j] = tt;
          const F m = (F(1) + tt) * prev + b * kt[j];
          row[j] = m;
          dqt[j] += m * g;
        }
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const F* mp = Mp.data() + (t - t0) * HH;
      const F* tht = Th.data() + (t - t0) * HH;
      const F* ct = c + t * H;
      const F* kt = k + t * H;
      const F* qt = q + t * H;
      F* dct = dc + t * H;
      F* dkt = dk + t * H;
      const bool reset = r[t];
      std::fill(dct, dct + H, F(0));
      std::fill(dkt, dkt + H, F(0));
      for (int64_t i = 0; i < H; ++i) {
        F* prow = P.data() + i * H;
        const F* mprow = mp + i * H;
        const F* tanh_row = tht + i * H;
        const F a = th[t * H + i], b = e[t * H + i], g = dy[t * H + i];
        F sum_th = 0, sum_e = 0;
#pragma omp simd reduction(+ : sum_th, sum_e)
        for (int64_t j = 0; j < H; ++j) {
          const F tt = tanh_row[j];
          const F G = g * qt[j] + prow[j];
          const F S = G * mprow[j] * (F(1) - tt * tt);
          sum_th += S * ct[j];
          dct[j] += S * a;
          sum_e += G * kt[j];
          dkt[j] += G * b;
          prow[j] = (F(1) + tt) * G;
        }
        dth[t * H + i] = sum_th;
        de[t * H + i] = sum_e;
      }
      // P_{t-1} = 0 across an episode start: a fill, not a product with (1 - r), so an inf in
      // G cannot become a NaN (0 · inf) in the previous episode.
      if (reset) std::fill(P.begin(), P.end(), F(0));
    }
  }
  std::memcpy(dm0, P.data(), HH * sizeof(F));
}

// Checks the shapes the Python wrapper promises and returns (n, T, H).
template <ffi::DataType DT>
ffi::ErrorOr<Shape> CheckShapes(const ffi::Buffer<DT>& theta, const ffi::Buffer<ffi::PRED>& r,
                                const ffi::Buffer<DT>& m0) {
  const auto dims = theta.dimensions();
  using Bad = ffi::Unexpected<ffi::Error>;
  if (dims.size() < 2) return Bad(ffi::Error::InvalidArgument("shm_native: theta must be [..., T, H]"));
  const int64_t T = dims[dims.size() - 2], H = dims[dims.size() - 1];
  if (T < 1 || H < 1) return Bad(ffi::Error::InvalidArgument("shm_native: T and H must be >= 1"));
  const int64_t n = static_cast<int64_t>(theta.element_count()) / (T * H);
  if (static_cast<int64_t>(r.element_count()) != n * T ||
      static_cast<int64_t>(m0.element_count()) != n * H * H) {
    return Bad(ffi::Error::InvalidArgument("shm_native: resets or memory shape does not match theta"));
  }
  return Shape{n, T, H};
}

template <ffi::DataType DT>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<DT> theta, ffi::Buffer<DT> c,
                   ffi::Buffer<DT> e, ffi::Buffer<DT> k, ffi::Buffer<DT> q,
                   ffi::Buffer<ffi::PRED> r, ffi::Buffer<DT> m0, ffi::ResultBuffer<DT> y,
                   ffi::ResultBuffer<DT> m_last, ffi::ResultBuffer<DT> starts, int64_t chunk) {
  auto shape = CheckShapes(theta, r, m0);
  if (shape.has_error()) return shape.error();
  const auto [n, T, H] = shape.value();
  const int64_t L = std::max<int64_t>(1, std::min(chunk, T));
  const int64_t chunks = (T + L - 1) / L;
  const bool keep = starts->element_count() != 0;
  if (keep && static_cast<int64_t>(starts->element_count()) != n * chunks * H * H) {
    return ffi::Error::InvalidArgument("shm_native: starts must be [..., ceil(T / chunk), H, H]");
  }
  using F = ffi::NativeType<DT>;
  ParallelFor(pool, n, T * H * H, [&](int64_t s) {
    const int64_t v = s * T * H;
    ForwardOne<F>(theta.typed_data() + v, c.typed_data() + v, e.typed_data() + v,
                  k.typed_data() + v, q.typed_data() + v, r.typed_data() + s * T,
                  m0.typed_data() + s * H * H, y->typed_data() + v,
                  m_last->typed_data() + s * H * H,
                  keep ? starts->typed_data() + s * chunks * H * H : nullptr, T, H, L);
  });
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<DT> theta, ffi::Buffer<DT> c,
                    ffi::Buffer<DT> e, ffi::Buffer<DT> k, ffi::Buffer<DT> q,
                    ffi::Buffer<ffi::PRED> r, ffi::Buffer<DT> starts, ffi::Buffer<DT> dy,
                    ffi::Buffer<DT> dm_last, ffi::ResultBuffer<DT> dtheta,
                    ffi::ResultBuffer<DT> dc, ffi::ResultBuffer<DT> de, ffi::ResultBuffer<DT> dk,
                    ffi::ResultBuffer<DT> dq, ffi::ResultBuffer<DT> dm0, int64_t chunk) {
  auto shape = CheckShapes(theta, r, dm_last);
  if (shape.has_error()) return shape.error();
  const auto [n, T, H] = shape.value();
  const int64_t L = std::max<int64_t>(1, std::min(chunk, T));
  const int64_t chunks = (T + L - 1) / L;
  if (static_cast<int64_t>(starts.element_count()) != n * chunks * H * H) {
    return ffi::Error::InvalidArgument("shm_native: starts must be [..., ceil(T / chunk), H, H]");
  }
  using F = ffi::NativeType<DT>;
  ParallelFor(pool, n, 3 * T * H * H, [&](int64_t s) {
    const int64_t v = s * T * H;
    BackwardOne<F>(theta.typed_data() + v, c.typed_data() + v, e.typed_data() + v,
                   k.typed_data() + v, q.typed_data() + v, r.typed_data() + s * T,
                   starts.typed_data() + s * chunks * H * H, dy.typed_data() + v,
                   dm_last.typed_data() + s * H * H, dtheta->typed_data() + v,
                   dc->typed_data() + v, de->typed_data() + v, dk->typed_data() + v,
                   dq->typed_data() + v, dm0->typed_data() + s * H * H, T, H, L);
  });
  return ffi::Error::Success();
}

template <ffi::DataType DT>
auto BindForward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<DT>>()  // theta
      .template Arg<ffi::Buffer<DT>>()  // c
      .template Arg<ffi::Buffer<DT>>()  // e = η v
      .template Arg<ffi::Buffer<DT>>()  // k
      .template Arg<ffi::Buffer<DT>>()  // q
      .template Arg<ffi::Buffer<ffi::PRED>>()  // resets
      .template Arg<ffi::Buffer<DT>>()  // M0
      .template Ret<ffi::Buffer<DT>>()  // Y
      .template Ret<ffi::Buffer<DT>>()  // M_last
      .template Ret<ffi::Buffer<DT>>()  // starts
      .template Attr<int64_t>("chunk");
}

template <ffi::DataType DT>
auto BindBackward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<DT>>()  // theta
      .template Arg<ffi::Buffer<DT>>()  // c
      .template Arg<ffi::Buffer<DT>>()  // e
      .template Arg<ffi::Buffer<DT>>()  // k
      .template Arg<ffi::Buffer<DT>>()  // q
      .template Arg<ffi::Buffer<ffi::PRED>>()  // resets
      .template Arg<ffi::Buffer<DT>>()  // starts
      .template Arg<ffi::Buffer<DT>>()  // dY
      .template Arg<ffi::Buffer<DT>>()  // dM_last
      .template Ret<ffi::Buffer<DT>>()  // dtheta
      .template Ret<ffi::Buffer<DT>>()  // dc
      .template Ret<ffi::Buffer<DT>>()  // de
      .template Ret<ffi::Buffer<DT>>()  // dk
      .template Ret<ffi::Buffer<DT>>()  // dq
      .template Ret<ffi::Buffer<DT>>()  // dM0
      .template Attr<int64_t>("chunk");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShmForwardF32, Forward<ffi::F32>, BindForward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShmForwardF64, Forward<ffi::F64>, BindForward<ffi::F64>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShmBackwardF32, Backward<ffi::F32>, BindBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ShmBackwardF64, Backward<ffi::F64>, BindBackward<ffi::F64>());
