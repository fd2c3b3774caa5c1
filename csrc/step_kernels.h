// Fused affine-step kernels for CPU (see diffrl_fast/ops/_problem.py for the mathematics).
//
// Rows r = 0..n_rows-1 of each latent tensor start at element
//     (r / n_inner) * so + (r % n_inner) * si
// of its data pointer and hold D contiguous elements. Per row the coefficient matrix holds
//     a, b, g, m0, cx, ce, limit      (kCoef columns, accumulation dtype)
// Forward returns per-row sums of squares ss = |y - mean|^2 and kk = |mean - ref_mean|^2 and optionally
// writes the mean; backward writes dx, dy, deu, dec from the per-row weights w_ss = dL/dss, w_kk = dL/dkk
// and an optional latent-sized g_mean = dL/dmean.
#pragma once

#include <cstdint>

namespace diffrl_fast {

constexpr int kCoef = 7;

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Rows {
  const void* ptr = nullptr;  // nullptr: tensor absent
  int64_t so = 0;             // element stride of the outer row group
  int64_t si = 0;             // element stride of the inner row group
};

struct StepArgs {
  int dtype = kFloat32;
  int64_t n_rows = 0, n_inner = 1, D = 0;
  Rows x, y, eu, ec, ref_eu, ref_ec;
  const void* coef = nullptr;  // [n_rows, kCoef], float (double for kFloat64)
  bool clip = false;
  int n_threads = 1;
};

struct FwdOut {
  void* ss = nullptr;    // [n_rows] accumulation dtype, or nullptr
  void* kk = nullptr;    // [n_rows] accumulation dtype, or nullptr
  void* mean = nullptr;  // [n_rows, D] input dtype, contiguous, or nullptr
};

struct BwdIn {
  const void* w_ss = nullptr;    // [n_rows] accumulation dtype, or nullptr
  const void* w_kk = nullptr;    // [n_rows] accumulation dtype, or nullptr
  const void* g_mean = nullptr;  // [n_rows, D] input dtype, contiguous, or nullptr
};

struct BwdOut {
  void* dx = nullptr;  // each [n_rows, D] input dtype, contiguous, or nullptr when not needed
  void* dy = nullptr;
  void* deu = nullptr;
  void* dec = nullptr;
};

// Elements per parallel task. Fixed (not derived from the thread count or batch size) so that every
// row is summed in the same order whatever the batch: recomputed log-probs match the rollout's bit for bit.
constexpr int64_t kChunk = 4096;
// Below this many elements a parallel region costs more than it saves (and stalls badly when the
// cores are oversubscribed): run on the calling thread.
constexpr int64_t kParallelMin = 1 << 16;

// The clipped PPO step loss of DDPO-IS/DPOK with its gradients, in one call (diffrl_fast/ops/ppo.py has the
// formulas). Per row: ss as step_fwd computes it (same chunks, same order: bit-identical), then
//     logp = -ss / (2 D s s) - log_s - log(2 pi)/2      ("mean"; "sum": -ss / (2 s s) - D (log_s + log(2 pi)/2))
// exactly as torch evaluates logprob_from_sq, the per-row surrogate and w = dL/dlogp, and at once the
// gradients of L = scale * sum_rows(loss_row) to the latents while the row is still in cache.
// A per-row value: ptr[r * stride] (stride 0: one value for all rows), or `value` when ptr is nullptr.
struct RowVal {
  const void* ptr = nullptr;
  int64_t stride = 0;
  double value = 0;
};

struct PPOArgs {
  // a, b, g per row when StepArgs.coef is nullptr (no x0 clipping); otherwise the coefficient matrix is used
  RowVal a, b, g;
  RowVal s, log_s;              // s > 0 and log(s) as torch computed it (bit parity with step_logprob)
  RowVal old_logp, adv;
  double clip_range = -1;        // < 0: REINFORCE (no ratio)
  double adv_clip = -1;          // < 0: no advantage clipping
  int clip_mode = 0;             // 0: max(-A rho, -A clamp(rho)) (PPO); 1: -A clamp(rho) (DPOK)
  int reduction = 0;             // 0: mean over the row's elements, 1: sum
  double scale = 1;              // loss = scale * sum of the per-row losses (1/n_rows: the mean)
};

struct PPOOut {
  void* logp = nullptr;   // [n_rows] accumulation dtype
  void* dlogp = nullptr;  // [n_rows] dL/dlogp (scale included)
  void* stats = nullptr;  // [5] accumulation dtype: loss, clipfrac, approx_kl, ratio_mean, rows with s <= 0 or a non-finite value
  void* dx = nullptr;     // gradients, [n_rows, D] input dtype, or nullptr
  void* dy = nullptr;
  void* deu = nullptr;
  void* dec = nullptr;
};

void ppo_step(const StepArgs& args, const PPOArgs& pa, const PPOOut& out);
void step_fwd(const StepArgs& args, const FwdOut& out);
void step_bwd(const StepArgs& args, const BwdIn& in, const BwdOut& out);

}  // namespace diffrl_fast
