// The quantized GEMM's drivers (qmatmul.cc): y = x @ W split into work items on XLA's
// intra-op pool, one row by the GEMV kernel (column chunks), more by the panel kernels
// (16-column panels); and the gated MLP's silu(x @ W_gate) * (x @ W_up), whose items
// compute the same columns of both products into a small per-thread scratch and the
// silu-multiply epilogue in float32 while those columns are still in cache.

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

// out[m * ldo + n] = silu(g) * u = g / (1 + exp(-g)) * u of g[m * ldi + n] and
// u[m * ldi + n], rows [0, M), columns [0, width), in float32.
inline void SiluMul(const float* g, const float* u, int64_t ldi, float* out, int64_t ldo,
                    int64_t M, int64_t width) {
  for (int64_t m = 0; m < M; ++m) {
    const float *gr = g + m * ldi, *ur = u + m * ldi;
    float* o = out + m * ldo;
    int64_t n = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; n + 8 <= width; n += 8) {
      const __m256 gv = _mm256_loadu_ps(gr + n);
      const __m256 e = Exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
      _mm256_storeu_ps(o + n, _mm256_mul_ps(silu, _mm256_loadu_ps(ur + n)));
    }
#endif
    for (; n < width; ++n) o[n] = gr[n] / (1.0f + std::exp(-gr[n])) * ur[n];
  }
}

// y [M, N] = silu(x @ W_gate) * (x @ W_up): `gate` and `up` share x and their shapes (their
// y is unused). Each work item computes the same columns of both (a GEMV chunk of row 0,
// or a 16-column panel of every row) into its thread's scratch, then their epilogue.
template <bool kInt4, bool kMin, typename S>
void ComputeGated(xla::ffi::ThreadPool& pool, const Problem<S>& gate, const Problem<S>& up,
                  float* y) {
  const std::vector<float> xsum = kMin ? GroupSums(gate) : std::vector<float>();
  const float* sums = xsum.data();
  const int64_t N = gate.N, workers = NumWorkers(pool);
  const bool gemv = UsesGemv(gate);
  const int64_t chunk = gemv ? GemvChunk(gate.K, N, workers, 2) : kPanel;
  const int64_t rows = gemv ? 1 : gate.M, size = rows * chunk;
  std::vector<float> scratch(workers * 2 * size);  // per thread: gate [rows, chunk], up
  ParallelFor(pool, (N + chunk - 1) / chunk, [&](int64_t item, int worker) {
    const int64_t n0 = item * chunk, n1 = std::min(n0 + chunk, N);
    Problem<S> g = gate, u = up;
    g.y = scratch.data() + worker * 2 * size;
    u.y = g.y + size;
    g.ldy = u.ldy = chunk;
    g.y0 = u.y0 = n0;
    if (gemv) {
      GemvItem<kInt4, kMin>(g, sums, n0, n1);
      GemvItem<kInt4, kMin>(u, sums, n0, n1);
    } else {
      Item<kInt4, kMin>(g, sums, item);
      Item<kInt4, kMin>(u, sums, item);
    }
    SiluMul(g.y, u.y, chunk, y + n0, N, rows, n1 - n0);
  });
}

}  // namespace qmatmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_COMPUTE_H_
