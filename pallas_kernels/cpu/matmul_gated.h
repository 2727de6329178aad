// The gated MLP of the gated_mlp handlers: y = silu(x @ Wg) * (x @ Wu), silu(g) =
// g / (1 + exp(-g)), the epilogue in float32 on the accumulators, so that neither product
// is ever written: items of 32 output columns whose microkernel keeps both products'
// accumulators (6 rows x (32 + 32) columns).

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_GATED_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_GATED_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "matmul_gemm.h"

namespace jaxserve_cpu {
namespace matmul {
namespace {

// y = silu(x @ wg) * (x @ wu), W [K, N] both: items of 32 output columns (both W's
// columns in one microkernel) x row chunks. bf16 packs the two 32-column slices into one
// 64-column panel where PackKN says packing pays.
constexpr int64_t kPanelGated = 32;

template <typename T>
void RunGated(xla::ffi::ThreadPool& pool, const T* x, const T* wg, const T* wu, T* y,
              int64_t M, int64_t K, int64_t N) {
  if (K == 0) {  // silu(0) * 0
    std::fill(y, y + M * N, FromF32<T>(0.0f));
    return;
  }
  int64_t panels = CeilDiv(N, kPanelGated);
  [[maybe_unused]] const bool packed = sizeof(T) == 2 && kHavePacked<T> && PackKN<T>(M, K);
  int64_t rows = RowChunk(M, panels, 6, packed ? CeilDiv(M, 6) * 6 : kMaxRowsFor<T>);
  int64_t chunks = CeilDiv(M, rows);
  ParallelForAhead(pool, panels * chunks, [&](int64_t item, int64_t next) {
    int64_t p = item / chunks, c = item % chunks;
    int64_t n0 = p * kPanelGated, m0 = c * rows, m1 = std::min(M, m0 + rows);
    int64_t ncols = std::min<int64_t>(kPanelGated, N - n0);
    [[maybe_unused]] Prefetch pf =
        NextPanel(wg, wu, N, n0, next < 0 ? -1 : next / chunks * kPanelGated);
    if constexpr (std::is_same_v<T, float>) {
#ifdef JAXSERVE_AVX512
      return BlockF32KN<false, true>(x, wg, y, K, N, m0, m1, n0, ncols, wu, pf);
#elif defined(JAXSERVE_AVX2)
      return avx2::Item<T, T, true, false>(x + m0 * K, wg + n0, wu + n0, K, N, m1 - m0, ncols,
                                           y + m0 * N + n0, N);
#endif
    } else {
#ifdef JAXSERVE_AVX512BF16
      if (packed) {
        thread_local std::vector<uint16_t> panel;
        const int64_t elems = CeilDiv(K, 2) * 128;
        if (static_cast<int64_t>(panel.size()) < elems) panel.resize(elems);
        PackPanelKN2(wg + n0, ncols, wu + n0, ncols, K, N, panel.data());
        return BlockBf16KN<true, uint16_t, true>(x, panel.data(), y, K, N, m0, m1, n0, ncols,
                                                 nullptr, pf);
      }
      return BlockBf16KN<false, uint16_t, true>(x, wg, y, K, N, m0, m1, n0, ncols, wu, pf);
#elif defined(JAXSERVE_AVX2)
      return avx2::Item<T, T, true, false>(x + m0 * K, wg + n0, wu + n0, K, N, m1 - m0, ncols,
                                           y + m0 * N + n0, N);
#endif
    }
    ScalarGated<T>(x, wg, wu, y, K, N, m0, m1, n0, n0 + ncols);
  });
}

}  // namespace
}  // namespace matmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_GATED_H_
