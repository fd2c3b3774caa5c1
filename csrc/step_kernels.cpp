// CPU kernels of the fused affine step. One task = one chunk of kChunk elements of one row; tasks are
// spread over OpenMP threads, per-task partial sums are combined per row in a fixed order.
#include "step_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <immintrin.h>
#define DIFFRL_HAS_MXCSR 1
// the widest float vector this build targets, for the few loops written with intrinsics (non-temporal stores)
#if defined(__AVX512F__)
#define DIFFRL_VEC(op) _mm512_##op
using VecF = __m512;
constexpr int kVecF = 16;
#elif defined(__AVX__)
#define DIFFRL_VEC(op) _mm256_##op
using VecF = __m256;
constexpr int kVecF = 8;
#else
#define DIFFRL_VEC(op) _mm_##op
using VecF = __m128;
constexpr int kVecF = 4;
#endif
#endif

namespace diffrl_fast {
namespace {

// ---- storage types and their conversions to the accumulation type ---------------------------------
using bf16_t = uint16_t;  // bfloat16 bits
using f16_t = _Float16;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

static inline float ld(float v) { return v; }
static inline double ld(double v) { return v; }
static inline float ld(f16_t v) { return static_cast<float>(v); }
static inline float ld(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T> static inline T st(typename Acc<T>::type v);
template <> inline float st<float>(float v) { return v; }
template <> inline double st<double>(double v) { return v; }
template <> inline f16_t st<f16_t>(float v) { return static_cast<f16_t>(v); }
template <> inline bf16_t st<bf16_t>(float v) {
  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return v != v ? static_cast<bf16_t>(0x7FC0u) : static_cast<bf16_t>(rounded);
}

// Denormal inputs or intermediates (e.g. vanishing loss gradients) make x86 arithmetic ~5x slower via
// microcode assists; they carry no signal here. Flush them to zero inside the kernels (FTZ + DAZ) and
// restore the caller's mode afterwards, per thread.
struct FlushDenormals {
#ifdef DIFFRL_HAS_MXCSR
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// ---- compile-time feature masks ------------------------------------------------------------------
constexpr int kEU = 1, kEC = 2, kY = 4, kREF = 8, kCLIP = 16, kMEAN = 32;  // forward; kMEAN = g_mean in backward
constexpr int kMasks = 64;

// Without eps there is nothing to guide, clip or compare: masks that set those bits are not instantiated.
constexpr bool valid_mask(int m) { return (m & kEU) || !(m & (kEC | kREF | kCLIP)); }

// One row's coefficients (a, b, g, m0, cx, ce, limit) and the clipped-branch slopes am = a - m0 cx, bm = b - m0 ce.
template <typename A>
struct RowCoefs {
  A a, b, g, m0, cx, ce, lim, am, bm;
  explicit RowCoefs(const A* c)
      : a(c[0]), b(c[1]), g(c[2]), m0(c[3]), cx(c[4]), ce(c[5]), lim(c[6]), am(c[0] - c[3] * c[4]), bm(c[1] - c[3] * c[5]) {}
  // no x0 clipping: m0 = cx = ce = lim = 0, so am = a and bm = b exactly as in the matrix form
  RowCoefs(A a_, A b_, A g_) : a(a_), b(b_), g(g_), m0(0), cx(0), ce(0), lim(0), am(a_ - A(0) * A(0)), bm(b_ - A(0) * A(0)) {}
};

template <typename A>
static inline A row_val(const RowVal& v, int64_t r) {
  return v.ptr ? static_cast<const A*>(v.ptr)[r * v.stride] : static_cast<A>(v.value);
}

template <typename T>
static inline const T* row_ptr(const Rows& t, int64_t r, int64_t n_inner, int64_t start) {
  return static_cast<const T*>(t.ptr) + (r / n_inner) * t.so + (r % n_inner) * t.si + start;
}

// mean and its local derivatives for one element; identical arithmetic in forward and backward.
template <bool EC, bool CLIP, typename A>
static inline A step_mean(A x, A eu, A ec, A a, A b, A g, A m0, A cx, A ce, A lim, A am, A bm, A& dmdx, A& dmde) {
  A e = eu;
  if constexpr (EC) e = eu + g * (ec - eu);
  A mean = a * x + b * e;
  dmdx = a;
  dmde = b;
  if constexpr (CLIP) {
    A x0 = cx * x + ce * e;
    bool clipped = (x0 > lim) | (x0 < -lim);
    A x0c = std::min(std::max(x0, -lim), lim);
    mean = clipped ? m0 * x0c + am * x + bm * e : mean;
    dmdx = clipped ? am : a;
    dmde = clipped ? bm : b;
  }
  return mean;
}

template <typename T, int M>
void fwd_impl(const StepArgs& args, const FwdOut& out) {
  if constexpr (!valid_mask(M)) {
    return;
  } else {
    constexpr bool EU = M & kEU, EC = M & kEC, Y = M & kY, REF = M & kREF, CLIP = M & kCLIP, MEAN = M & kMEAN;
    using A = typename Acc<T>::type;
    const int64_t D = args.D, n_inner = args.n_inner;
    const int64_t n_chunk = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
    const int64_t n_task = args.n_rows * n_chunk;
    std::vector<A> part_ss(Y ? n_task : 0), part_kk(REF ? n_task : 0);
    const A* coef = static_cast<const A*>(args.coef);
    T* mean_out = static_cast<T*>(out.mean);

#pragma omp parallel num_threads(args.n_threads) if (n_task > 1 && args.n_rows * D >= kParallelMin)
    {
    FlushDenormals ftz;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < n_task; ++task) {
      const int64_t r = task / n_chunk, start = (task % n_chunk) * kChunk;
      const int64_t len = std::min(kChunk, D - start);
      const RowCoefs<A> rc(coef + r * kCoef);
      const A a = rc.a, b = rc.b, g = rc.g, m0 = rc.m0, cx = rc.cx, ce = rc.ce, lim = rc.lim, am = rc.am, bm = rc.bm;
      const T* px = row_ptr<T>(args.x, r, n_inner, start);
      const T* py = Y ? row_ptr<T>(args.y, r, n_inner, start) : nullptr;
      const T* peu = EU ? row_ptr<T>(args.eu, r, n_inner, start) : nullptr;
      const T* pec = EC ? row_ptr<T>(args.ec, r, n_inner, start) : nullptr;
      const T* pru = REF ? row_ptr<T>(args.ref_eu, r, n_inner, start) : nullptr;
      const T* prc = (REF && EC) ? row_ptr<T>(args.ref_ec, r, n_inner, start) : nullptr;
      T* pm = MEAN ? mean_out + r * D + start : nullptr;
      A s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t i = 0; i < len; ++i) {
        const A x = ld(px[i]);
        A mean, dmdx, dmde;
        if constexpr (EU) {
          mean = step_mean<EC, CLIP, A>(x, ld(peu[i]), EC ? ld(pec[i]) : A(0), a, b, g, m0, cx, ce, lim, am, bm, dmdx, dmde);
        } else {
          mean = a * x;
        }
        if constexpr (MEAN) pm[i] = st<T>(mean);
        if constexpr (Y) {
          const A d = ld(py[i]) - mean;
          s1 += d * d;
        }
        if constexpr (REF) {
          const A rmean = step_mean<EC, CLIP, A>(x, ld(pru[i]), EC ? ld(prc[i]) : A(0), a, b, g, m0, cx, ce, lim, am, bm, dmdx, dmde);
          const A d = mean - rmean;
          s2 += d * d;
        }
      }
      if constexpr (Y) part_ss[task] = s1;
      if constexpr (REF) part_kk[task] = s2;
    }
    }
    for (int64_t r = 0; r < args.n_rows; ++r) {
      double t1 = 0, t2 = 0;
      for (int64_t k = 0; k < n_chunk; ++k) {
        if constexpr (Y) t1 += part_ss[r * n_chunk + k];
        if constexpr (REF) t2 += part_kk[r * n_chunk + k];
      }
      if constexpr (Y) static_cast<A*>(out.ss)[r] = static_cast<A>(t1);
      if constexpr (REF) static_cast<A*>(out.kk)[r] = static_cast<A>(t2);
    }
  }
}

// Backward. Outputs that are not needed are nullptr; the checks are loop-invariant and hoisted.
template <typename T, int M>
void bwd_impl(const StepArgs& args, const BwdIn& in, const BwdOut& out) {
  if constexpr (!valid_mask(M)) {
    return;
  } else {
    constexpr bool EU = M & kEU, EC = M & kEC, Y = M & kY, REF = M & kREF, CLIP = M & kCLIP, GMEAN = M & kMEAN;
    using A = typename Acc<T>::type;
    const int64_t D = args.D, n_inner = args.n_inner;
    const int64_t n_chunk = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
    const int64_t n_task = args.n_rows * n_chunk;
    const A* coef = static_cast<const A*>(args.coef);
    const A* w_ss = static_cast<const A*>(in.w_ss);
    const A* w_kk = static_cast<const A*>(in.w_kk);

#pragma omp parallel num_threads(args.n_threads) if (n_task > 1 && args.n_rows * D >= kParallelMin)
    {
    FlushDenormals ftz;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < n_task; ++task) {
      const int64_t r = task / n_chunk, start = (task % n_chunk) * kChunk;
      const int64_t len = std::min(kChunk, D - start);
      const RowCoefs<A> rc(coef + r * kCoef);
      const A a = rc.a, b = rc.b, g = rc.g, m0 = rc.m0, cx = rc.cx, ce = rc.ce, lim = rc.lim, am = rc.am, bm = rc.bm;
      const A two_ws = Y ? A(2) * w_ss[r] : A(0), two_wk = REF ? A(2) * w_kk[r] : A(0);
      const A one_minus_g = A(1) - g;
      const T* px = row_ptr<T>(args.x, r, n_inner, start);
      const T* py = Y ? row_ptr<T>(args.y, r, n_inner, start) : nullptr;
      const T* peu = EU ? row_ptr<T>(args.eu, r, n_inner, start) : nullptr;
      const T* pec = EC ? row_ptr<T>(args.ec, r, n_inner, start) : nullptr;
      const T* pru = REF ? row_ptr<T>(args.ref_eu, r, n_inner, start) : nullptr;
      const T* prc = (REF && EC) ? row_ptr<T>(args.ref_ec, r, n_inner, start) : nullptr;
      const T* pg = GMEAN ? static_cast<const T*>(in.g_mean) + r * D + start : nullptr;
      const int64_t o = r * D + start;
      T* dx = out.dx ? static_cast<T*>(out.dx) + o : nullptr;
      T* dy = out.dy ? static_cast<T*>(out.dy) + o : nullptr;
      T* deu = out.deu ? static_cast<T*>(out.deu) + o : nullptr;
      T* dec = out.dec ? static_cast<T*>(out.dec) + o : nullptr;

      // dL/dmean, dmean/dx, dmean/de and dL/dy of element i (inlined into each loop below).
      // dx_ref: x_t also enters ref_mean, so dL/dx gets -2 w_kk (mean - ref_mean) dref_mean/dx.
      auto grad = [&](int64_t i, A& dm, A& dmdx, A& dmde, A& dyv, A& dx_ref) {
        const A x = ld(px[i]);
        A mean;
        if constexpr (EU) {
          mean = step_mean<EC, CLIP, A>(x, ld(peu[i]), EC ? ld(pec[i]) : A(0), a, b, g, m0, cx, ce, lim, am, bm, dmdx, dmde);
        } else {
          mean = a * x;
          dmdx = a;
          dmde = A(0);
        }
        dm = 0;
        dyv = 0;
        dx_ref = 0;
        if constexpr (Y) {
          dyv = two_ws * (ld(py[i]) - mean);
          dm -= dyv;
        }
        if constexpr (REF) {
          A rdmdx, unused_e;
          const A rmean = step_mean<EC, CLIP, A>(x, ld(pru[i]), EC ? ld(prc[i]) : A(0), a, b, g, m0, cx, ce, lim, am, bm,
                                                 rdmdx, unused_e);
          const A dkk = two_wk * (mean - rmean);
          dm += dkk;
          dx_ref = dkk * rdmdx;
        }
        if constexpr (GMEAN) dm += ld(pg[i]);
      };
      A dm, dmdx, dmde, dyv, dx_ref;
      if (EU && !dx && !dy && deu && (dec || !EC)) {
        // the training hot path: gradients to the model outputs only, branch-free
#pragma omp simd private(dm, dmdx, dmde, dyv, dx_ref)
        for (int64_t i = 0; i < len; ++i) {
          grad(i, dm, dmdx, dmde, dyv, dx_ref);
          const A de = dm * dmde;
          if constexpr (EC) {
            deu[i] = st<T>(one_minus_g * de);
            dec[i] = st<T>(g * de);
          } else {
            deu[i] = st<T>(de);
          }
        }
      } else {
#pragma omp simd private(dm, dmdx, dmde, dyv, dx_ref)
        for (int64_t i = 0; i < len; ++i) {
          grad(i, dm, dmdx, dmde, dyv, dx_ref);
          const A de = dm * dmde;
          if (dx) dx[i] = st<T>(dm * dmdx - dx_ref);
          if (dy) dy[i] = st<T>(dyv);
          if (deu) deu[i] = st<T>(EC ? one_minus_g * de : de);
          if (dec) dec[i] = st<T>(g * de);
        }
      }
    }
    }
  }
}

// ---- the fused PPO step loss ----------------------------------------------------------------------
constexpr int pEU = 1, pEC = 2, pCLIP = 4, kPPOMasks = 8;
constexpr double kHalfLog2Pi = 0.91893853320467274178;  // log(2 pi) / 2, as HALF_LOG_2PI in ops/step.py

// Sum of squares of one chunk of one row, written exactly as fwd_impl's loop (same arithmetic, same
// reduction), optionally keeping the residual y - mean in `res` for the gradient pass.
template <bool EC, bool CLIP, bool EU, bool STORE, typename T, typename A>
static inline A chunk_ss(const T* px, const T* py, const T* peu, const T* pec, int64_t len, const RowCoefs<A>& rc, A* res) {
  const A a = rc.a, b = rc.b, g = rc.g, m0 = rc.m0, cx = rc.cx, ce = rc.ce, lim = rc.lim, am = rc.am, bm = rc.bm;
  A s1 = 0;
#pragma omp simd reduction(+ : s1)
  for (int64_t i = 0; i < len; ++i) {
    const A x = ld(px[i]);
    A mean, dmdx, dmde;
    if constexpr (EU) {
      mean = step_mean<EC, CLIP, A>(x, ld(peu[i]), EC ? ld(pec[i]) : A(0), a, b, g, m0, cx, ce, lim, am, bm, dmdx, dmde);
    } else {
      mean = a * x;
    }
    const A d = ld(py[i]) - mean;
    if constexpr (STORE) res[i] = d;
    s1 += d * d;
  }
  return s1;
}

// Non-temporal stores for a gradient are used when one call's latent data (inputs and gradients) is at least
// this large: a typical last-level cache slice of a server core complex (32 MiB on AMD EPYC; sysconf's figure
// is the whole package's on many VMs, so a constant is used). Below it the gradient stays in cache for its
// consumer; above it its lines would be evicted before use anyway, and streaming them saves the read for
// ownership that an ordinary store makes.
constexpr int64_t kStreamMinBytes = int64_t(32) << 20;

// The two eps gradients of one row from the residual r kept in place in the first one (float32/float64):
//   dec[i] = cc r[i],  deu[i] = cu r[i]   (dec = nullptr: unguided, deu[i] = cu r[i] only)
// The arithmetic is the same as scaling a separate residual buffer, so the results are bit-identical.
// `stream`: dec is written with non-temporal stores (float32, x86).
template <typename A>
static inline void split_residual(A* deu, A* dec, A cu, A cc, int64_t n, bool stream) {
#ifdef DIFFRL_HAS_MXCSR
  if constexpr (std::is_same<A, float>::value) {
    if (stream && dec) {
      const auto one = [&](int64_t j) {
        const A v = deu[j];
        dec[j] = cc * v;
        deu[j] = cu * v;
      };
      int64_t i = 0;
      for (; i < n && (reinterpret_cast<uintptr_t>(dec + i) & 63u) != 0; ++i) one(i);  // to a 64-byte boundary
      const VecF vc = DIFFRL_VEC(set1_ps)(cc), vu = DIFFRL_VEC(set1_ps)(cu);
      for (; i + kVecF <= n; i += kVecF) {
        const VecF v = DIFFRL_VEC(loadu_ps)(deu + i);
        DIFFRL_VEC(stream_ps)(dec + i, DIFFRL_VEC(mul_ps)(vc, v));
        DIFFRL_VEC(storeu_ps)(deu + i, DIFFRL_VEC(mul_ps)(vu, v));
      }
      for (; i < n; ++i) one(i);
      _mm_sfence();  // the streamed lines are globally visible before the row is reported done
      return;
    }
  }
#endif
  if (dec) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const A v = deu[i];
      dec[i] = cc * v;
      deu[i] = cu * v;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) deu[i] = cu * deu[i];
  }
}

template <typename T, int M>
void ppo_impl(const StepArgs& args, const PPOArgs& pa, const PPOOut& out) {
  constexpr bool EU = M & pEU, EC = M & pEC, CLIP = M & pCLIP;
  if constexpr (!EU && (EC || CLIP)) {
    return;
  } else {
    using A = typename Acc<T>::type;
    const int64_t D = args.D, n_inner = args.n_inner, N = args.n_rows;
    const int64_t n_chunk = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
    const A* coef = static_cast<const A*>(args.coef);
    A* logp_out = static_cast<A*>(out.logp);
    A* dlogp_out = static_cast<A*>(out.dlogp);
    const bool grads = out.dx || out.dy || out.deu || out.dec;
    const bool hot = EU && !out.dx && !out.dy && out.deu && (out.dec || !EC);
    // hot, unclipped, gradients in the accumulation type: pass 1 keeps the residual in deu's row itself (no
    // scratch buffer competing for L2 with the streaming inputs; deu's lines are fetched while the inputs are)
    constexpr bool kSameType = std::is_same<T, A>::value;
    const bool in_place = kSameType && !CLIP && hot;
    const bool stream = in_place && out.dec && 6 * N * D * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
    const bool ratio = pa.clip_range >= 0;
    const A lo = A(1.0 - pa.clip_range), hi = A(1.0 + pa.clip_range), cr = A(pa.clip_range);
    const A ac = A(pa.adv_clip);
    const A dred = pa.reduction == 0 ? A(D) : A(1);
    // per-row statistics, reduced in row order afterwards (deterministic whatever the thread count)
    std::vector<double> loss_r(N), clip_r(N), kl_r(N), ratio_r(N);
    std::vector<char> bad_r(N);

#pragma omp parallel num_threads(args.n_threads) if (N > 1 && N * D >= kParallelMin)
    {
    FlushDenormals ftz;
    static thread_local std::vector<A> scratch;
    if (grads && !in_place && static_cast<int64_t>(scratch.size()) < D) scratch.resize(D);
    A* res = grads ? scratch.data() : nullptr;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; ++r) {
      const RowCoefs<A> rc = coef ? RowCoefs<A>(coef + r * kCoef)
                                  : RowCoefs<A>(row_val<A>(pa.a, r), row_val<A>(pa.b, r), row_val<A>(pa.g, r));
      // pass 1: ss in step_fwd's chunks and order, residuals kept for pass 2
      double tot = 0;
      A* rbuf = res;
      if constexpr (kSameType) {
        if (in_place) rbuf = reinterpret_cast<A*>(static_cast<T*>(out.deu) + r * D);
      }
      for (int64_t k = 0; k < n_chunk; ++k) {
        const int64_t start = k * kChunk, len = std::min(kChunk, D - start);
        const T* px = row_ptr<T>(args.x, r, n_inner, start);
        const T* py = row_ptr<T>(args.y, r, n_inner, start);
        const T* peu = EU ? row_ptr<T>(args.eu, r, n_inner, start) : nullptr;
        const T* pec = EC ? row_ptr<T>(args.ec, r, n_inner, start) : nullptr;
        tot += grads ? chunk_ss<EC, CLIP, EU, true>(px, py, peu, pec, len, rc, rbuf + start)
                     : chunk_ss<EC, CLIP, EU, false>(px, py, peu, pec, len, rc, static_cast<A*>(nullptr));
      }
      const A ss = static_cast<A>(tot);
      // log p, evaluated in torch's order (logprob_from_sq) so that it equals step_logprob bit for bit
      const A s = row_val<A>(pa.s, r), ls = row_val<A>(pa.log_s, r);
      A lp;
      if (pa.reduction == 0) {
        const A den = (A(2.0 * static_cast<double>(D)) * s) * s;
        lp = ((-ss) / den - ls) - A(kHalfLog2Pi);
      } else {
        const A den = (A(2) * s) * s;
        lp = (-ss) / den - A(D) * (ls + A(kHalfLog2Pi));
      }
      A adv = row_val<A>(pa.adv, r);
      if (pa.adv_clip >= 0) adv = std::min(std::max(adv, -ac), ac);
      const A lr = lp - row_val<A>(pa.old_logp, r);
      A dl;  // dL_row / dlogp
      double lrow, rho_d = 0, cf = 0;
      if (!ratio) {
        lrow = -adv * lp;
        dl = -adv;
      } else {
        const A rho = std::exp(lr);
        const A rcl = std::min(std::max(rho, lo), hi);
        const A unc = -adv * rho, clp = -adv * rcl;
        const bool inside = rho >= lo && rho <= hi;
        if (pa.clip_mode == 1) {
          lrow = clp;
          dl = inside ? -adv * rho : A(0);
        } else {
          lrow = std::max(unc, clp);
          dl = (unc > clp || inside) ? -adv * rho : A(0);
        }
        rho_d = rho;
        cf = std::abs(rho - A(1)) > cr ? 1.0 : 0.0;
      }
      dl = dl * A(pa.scale);
      logp_out[r] = lp;
      dlogp_out[r] = dl;
      loss_r[r] = lrow;
      clip_r[r] = cf;
      kl_r[r] = 0.5 * static_cast<double>(lr) * static_cast<double>(lr);
      ratio_r[r] = rho_d;
      bad_r[r] = !(s > A(0)) || !std::isfinite(static_cast<double>(lp)) || !std::isfinite(static_cast<double>(adv)) ||
                 !std::isfinite(static_cast<double>(lr)) || !std::isfinite(static_cast<double>(rc.a)) ||
                 !std::isfinite(static_cast<double>(rc.b)) || !std::isfinite(static_cast<double>(rc.g));
      if (!grads) continue;
      // pass 2: the gradients from the residuals still in cache. dL/dmean = c (y - mean).
      const A c = dl / ((dred * s) * s);
      const int64_t o = r * D;
      T* dx = out.dx ? static_cast<T*>(out.dx) + o : nullptr;
      T* dy = out.dy ? static_cast<T*>(out.dy) + o : nullptr;
      T* deu = out.deu ? static_cast<T*>(out.deu) + o : nullptr;
      T* dec = out.dec ? static_cast<T*>(out.dec) + o : nullptr;
      const A a = rc.a, b = rc.b, g = rc.g, m0 = rc.m0, cx = rc.cx, ce = rc.ce, lim = rc.lim, am = rc.am, bm = rc.bm;
      const A cu = EC ? (A(1) - g) * b * c : b * c, cc = g * b * c;
      if (in_place) {
        split_residual<A>(rbuf, EC ? reinterpret_cast<A*>(dec) : nullptr, cu, cc, D, stream);
        continue;
      }
      if (!CLIP && hot) {
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) {
          deu[i] = st<T>(cu * res[i]);
          if constexpr (EC) dec[i] = st<T>(cc * res[i]);
        }
        continue;
      }
      for (int64_t k = 0; k < n_chunk; ++k) {
        const int64_t start = k * kChunk, len = std::min(kChunk, D - start);
        const T* px = row_ptr<T>(args.x, r, n_inner, start);
        const T* peu = EU ? row_ptr<T>(args.eu, r, n_inner, start) : nullptr;
        const T* pec = EC ? row_ptr<T>(args.ec, r, n_inner, start) : nullptr;
        const A* pr = res + start;
        for (int64_t i = 0; i < len; ++i) {
          const A dm = c * pr[i];
          A dmdx = a, dmde = b;
          if constexpr (CLIP) {
            step_mean<EC, CLIP, A>(ld(px[i]), ld(peu[i]), EC ? ld(pec[i]) : A(0), a, b, g, m0, cx, ce, lim, am, bm, dmdx, dmde);
          }
          const A de = dm * dmde;
          if (dx) dx[start + i] = st<T>(dm * dmdx);
          if (dy) dy[start + i] = st<T>(-dm);
          if (deu) deu[start + i] = st<T>(EC ? (A(1) - g) * de : de);
          if (dec) dec[start + i] = st<T>(g * de);
        }
      }
    }
    }
    double sl = 0, sc = 0, sk = 0, sr = 0, nb = 0;
    for (int64_t r = 0; r < N; ++r) {
      sl += loss_r[r];
      sc += clip_r[r];
      sk += kl_r[r];
      sr += ratio_r[r];
      nb += bad_r[r];
    }
    const double inv = N ? 1.0 / static_cast<double>(N) : 0.0;
    A* stats = static_cast<A*>(out.stats);
    stats[0] = static_cast<A>(sl * pa.scale);
    stats[1] = static_cast<A>(sc * inv);
    stats[2] = static_cast<A>(sk * inv);
    stats[3] = static_cast<A>(ratio ? sr * inv : 0.0);
    stats[4] = static_cast<A>(nb);
  }
}

template <typename T, int... Ms>
void ppo_dispatch(int mask, std::integer_sequence<int, Ms...>, const StepArgs& args, const PPOArgs& pa, const PPOOut& out) {
  using Fn = void (*)(const StepArgs&, const PPOArgs&, const PPOOut&);
  static constexpr Fn table[] = {&ppo_impl<T, Ms>...};
  table[mask](args, pa, out);
}

template <typename T, int... Ms>
void fwd_dispatch(int mask, std::integer_sequence<int, Ms...>, const StepArgs& args, const FwdOut& out) {
  using Fn = void (*)(const StepArgs&, const FwdOut&);
  static constexpr Fn table[] = {&fwd_impl<T, Ms>...};
  table[mask](args, out);
}

template <typename T, int... Ms>
void bwd_dispatch(int mask, std::integer_sequence<int, Ms...>, const StepArgs& args, const BwdIn& in, const BwdOut& out) {
  using Fn = void (*)(const StepArgs&, const BwdIn&, const BwdOut&);
  static constexpr Fn table[] = {&bwd_impl<T, Ms>...};
  table[mask](args, in, out);
}

template <typename F>
void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kFloat16: f(f16_t{}); break;
    case kBFloat16: f(bf16_t{}); break;
  }
}

int base_mask(const StepArgs& a) {
  int m = 0;
  if (a.eu.ptr) m |= kEU;
  if (a.ec.ptr) m |= kEC;
  if (a.ref_eu.ptr) m |= kREF;
  if (a.clip) m |= kCLIP;
  return m;
}

}  // namespace

void step_fwd(const StepArgs& args, const FwdOut& out) {
  int mask = base_mask(args);
  if (out.ss) mask |= kY;
  if (!out.kk) mask &= ~kREF;
  if (out.mean) mask |= kMEAN;
  by_dtype(args.dtype, [&](auto tag) {
    fwd_dispatch<decltype(tag)>(mask, std::make_integer_sequence<int, kMasks>{}, args, out);
  });
}

void ppo_step(const StepArgs& args, const PPOArgs& pa, const PPOOut& out) {
  int mask = 0;
  if (args.eu.ptr) mask |= pEU;
  if (args.ec.ptr) mask |= pEC;
  if (args.clip) mask |= pCLIP;
  by_dtype(args.dtype, [&](auto tag) {
    ppo_dispatch<decltype(tag)>(mask, std::make_integer_sequence<int, kPPOMasks>{}, args, pa, out);
  });
}

void step_bwd(const StepArgs& args, const BwdIn& in, const BwdOut& out) {
  int mask = base_mask(args);
  if (in.w_ss) mask |= kY;
  if (!in.w_kk) mask &= ~kREF;
  if (in.g_mean) mask |= kMEAN;
  by_dtype(args.dtype, [&](auto tag) {
    bwd_dispatch<decltype(tag)>(mask, std::make_integer_sequence<int, kMasks>{}, args, in, out);
  });
}

}  // namespace diffrl_fast
