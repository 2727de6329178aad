// The quantized GEMM's drivers (qmatmul.cc): y = x @ W split into work items on XLA's
// intra-op pool, one row by the GEMV kernel (column chunks), more by the panel kernels
// (16-column panels); and the gated MLP's silu(x @ W_gate) * (x @ W_up), whose items
// compute the same columns of both products and the silu-multiply epilogue in float32
// while those columns are still in cache.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_COMPUTE_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_COMPUTE_H_

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "qmatmul_common.h"
#include "qmatmul_gemv.h"
#include "qmatmul_panel.h"
#include "threading.h"
#include "xla/ffi/api/ffi.h"

namespace jaxserve_cpu {
namespace qmatmul {

// One work item of the panel kernels: a 16-column panel (or the last, narrower one) over
// every row.
template <bool kInt4, bool kMin, typename S>
void Item(const Problem<S>& p, const float* xsum, int64_t panel) {
  const int64_t n0 = panel * kPanel, n1 = std::min(n0 + kPanel, p.N);
#ifdef JAXSERVE_QMATMUL_SIMD
  if (n1 - n0 == kPanel) {
    int64_t m = 0;
    for (; m + kMr <= p.M; m += kMr) Panel<kMr, kInt4, kMin>(p, xsum, m, n0);
    switch (p.M - m) {
      case 3: Panel<3, kInt4, kMin>(p, xsum, m, n0); break;
      case 2: Panel<2, kInt4, kMin>(p, xsum, m, n0); break;
      case 1: Panel<1, kInt4, kMin>(p, xsum, m, n0); break;
      default: break;
    }
    return;
  }
#endif
  BlockScalar<kInt4, kMin>(p, xsum, 0, p.M, n0, n1);
}

// Whether row 0 alone runs the GEMV kernel.
template <typename S>
inline bool UsesGemv(const Problem<S>& p) {
#ifdef JAXSERVE_QMATMUL_GEMV
  return p.M == 1 && p.g % 2 == 0;
#else
  return false;
#endif
}

// Columns [n0, n1) of row 0 by the GEMV kernel, the last N % 32 columns by the loops.
template <bool kInt4, bool kMin, typename S>
void GemvItem(const Problem<S>& p, const float* xsum, int64_t n0, int64_t n1) {
#ifdef JAXSERVE_QMATMUL_GEMV
  const int64_t simd_end = std::min(n1, p.N / 32 * 32);
  if (simd_end > n0) GemvColumns<kInt4, kMin>(p, xsum, n0, simd_end);
  if (n1 > simd_end) BlockScalar<kInt4, kMin>(p, xsum, 0, 1, std::max(n0, simd_end), n1);
#else
  BlockScalar<kInt4, kMin>(p, xsum, 0, 1, n0, n1);
#endif
}

// y = x @ W for the p.M rows of p: one row by the GEMV kernel, more by the panel kernels.
template <bool kInt4, bool kMin, typename S>
void Compute(xla::ffi::ThreadPool& pool, const Problem<S>& p) {
  const std::vector<float> xsum = kMin ? GroupSums(p) : std::vector<float>();
  const float* sums = xsum.data();
  if (UsesGemv(p)) {
    const int64_t chunk = GemvChunk(p.K, p.N, NumWorkers(pool));
    ParallelFor(pool, (p.N + chunk - 1) / chunk, [&](int64_t item) {
      const int64_t n0 = item * chunk;
      GemvItem<kInt4, kMin>(p, sums, n0, std::min(n0 + chunk, p.N));
    });
    return;
  }
  ParallelFor(pool, (p.N + kPanel - 1) / kPanel,
              [&p, sums](int64_t panel) { Item<kInt4, kMin>(p, sums, panel); });
}

// y[m, n] = silu(g[m, n]) * u[m, n] = g / (1 + exp(-g)) * u for rows [0, M), columns
// [n0, n1) of [M, N] arrays, in float32.
inline void SiluMulColumns(const float* g, const float* u, float* y, int64_t M, int64_t N,
                           int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t row = m * N;
    int64_t n = n0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; n + 8 <= n1; n += 8) {
      const __m256 gv = _mm256_loadu_ps(g + row + n);
      const __m256 e = Exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
      _mm256_storeu_ps(y + row + n, _mm256_mul_ps(silu, _mm256_loadu_ps(u + row + n)));
    }
#endif
    for (; n < n1; ++n) y[row + n] = g[row + n] / (1.0f + std::exp(-g[row + n])) * u[row + n];
  }
}

// y [M, N] = silu(x @ W_gate) * (x @ W_up): `gate` and `up` share x and their shapes and
// write their products into scratch ([M, N] each); each work item computes the same
// columns of both, then their epilogue.
template <bool kInt4, bool kMin, typename S>
void ComputeGated(xla::ffi::ThreadPool& pool, const Problem<S>& gate, const Problem<S>& up,
                  float* y) {
  const std::vector<float> xsum = kMin ? GroupSums(gate) : std::vector<float>();
  const float* sums = xsum.data();
  const int64_t M = gate.M, N = gate.N;
  if (UsesGemv(gate)) {
    const int64_t chunk = GemvChunk(gate.K, N, NumWorkers(pool), 2);
    ParallelFor(pool, (N + chunk - 1) / chunk, [&](int64_t item) {
      const int64_t n0 = item * chunk, n1 = std::min(n0 + chunk, N);
      GemvItem<kInt4, kMin>(gate, sums, n0, n1);
      GemvItem<kInt4, kMin>(up, sums, n0, n1);
      SiluMulColumns(gate.y, up.y, y, 1, N, n0, n1);
    });
    return;
  }
  ParallelFor(pool, (N + kPanel - 1) / kPanel, [&](int64_t panel) {
    Item<kInt4, kMin>(gate, sums, panel);
    Item<kInt4, kMin>(up, sums, panel);
    const int64_t n0 = panel * kPanel;
    SiluMulColumns(gate.y, up.y, y, M, N, n0, std::min(n0 + kPanel, N));
  });
}

}  // namespace qmatmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_COMPUTE_H_
