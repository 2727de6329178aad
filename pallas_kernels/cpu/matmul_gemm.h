// The products of the matmul handlers, y = x @ W ("kn", W [K, N]) and y = x @ W^T ("nk",
// W [N, K]): work items of (column panel x row chunk) run by ParallelFor (threading.h),
// each computing one block (matmul_blocks.h) from W in place, or from a panel of W packed
// first (matmul_pack.h) where that pays.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_GEMM_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_GEMM_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "matmul_blocks.h"
#include "matmul_pack.h"

namespace jaxserve_cpu {
namespace matmul {
namespace {

constexpr int64_t kPanelKN = 64;   // columns per kn work item
constexpr int64_t kPanelNK = 96;   // W rows per nk work item
constexpr int64_t kMaxRows = 96;   // x rows per work item (x chunk stays in L2)

// Whether the AVX2 path (matmul_avx2.h) computes products of T here.
template <typename T>
constexpr bool kAvx2Path = false;
#if defined(JAXSERVE_AVX2) && !defined(JAXSERVE_AVX512)
template <>
constexpr bool kAvx2Path<float> = true;
#endif
#if defined(JAXSERVE_AVX2) && !defined(JAXSERVE_AVX512BF16)
template <>
constexpr bool kAvx2Path<uint16_t> = true;
#endif

// x rows per work item: an AVX2 item packs its panel of W, which more rows amortize.
template <typename T>
constexpr int64_t kMaxRowsFor = kAvx2Path<T> ? 384 : kMaxRows;


// The nk product for M >= kPackRowsNK*: each item packs its 64 W rows transposed and runs
// the packed kn microkernels on them.
template <typename T, typename YT>
void RunNKPacked(xla::ffi::ThreadPool& pool, const T* x, const T* w, YT* y, int64_t M,
                 int64_t K, int64_t N) {
  constexpr bool kBf16 = sizeof(T) == 2;
  const int64_t units = kBf16 ? CeilDiv(K, 2) : K;  // 32-bit units per packed W row
  int64_t panels = CeilDiv(N, 64);
  // x rows per item: ~256 KiB of x (so that x and the panel stay in L2) but at least 128
  // rows, so that a panel is not packed again too often.
  const int64_t max_rows = std::max<int64_t>(128, (256 << 10) / (K * sizeof(T)));
  int64_t rows = RowChunk(M, panels, 6, max_rows);
  int64_t chunks = CeilDiv(M, rows);
  ParallelFor(pool, panels * chunks, [&](int64_t item) {
    int64_t p = item / chunks, c = item % chunks;
    int64_t n0 = p * 64, m0 = c * rows, nrows = std::min<int64_t>(64, N - n0);
    thread_local std::vector<uint32_t> panel;
    if (static_cast<int64_t>(panel.size()) < units * 64) panel.resize(units * 64);
    const char* src = reinterpret_cast<const char*>(w + n0 * K);
    PackPanel32(src, K * sizeof(T), nrows, kBf16 ? K / 2 : K, panel.data());
    if (kBf16 && K % 2) {  // the last, single K: (W[n, K-1], 0)
      for (int64_t r = 0; r < 64; ++r) {
        uint16_t v = 0;
        if (r < nrows) std::memcpy(&v, src + (r * K + K - 1) * sizeof(T), 2);
        panel[(K / 2) * 64 + r] = v;
      }
    }
    BlockKNPacked<T, YT>(x, reinterpret_cast<const T*>(panel.data()), y, K, N, m0,
                         std::min(M, m0 + rows), n0, nrows);
  });
}

// The kn product where PackKN says packing pays: each item packs its 64-column panel.
template <typename T, typename YT>
void RunKNPacked(xla::ffi::ThreadPool& pool, const T* x, const T* w, YT* y, int64_t M,
                 int64_t K, int64_t N) {
  const int64_t panel_elems = (sizeof(T) == 2 ? CeilDiv(K, 2) * 2 : K) * 64;
  int64_t panels = CeilDiv(N, 64);
  // (not max_rows = M: M = 64 would split into 60 + 4 rows, each chunk packing the panel)
  int64_t rows = RowChunk(M, panels, 6, CeilDiv(M, 6) * 6);
  int64_t chunks = CeilDiv(M, rows);
  ParallelFor(pool, panels * chunks, [&](int64_t item) {
    int64_t p = item / chunks, c = item % chunks;
    int64_t n0 = p * 64, m0 = c * rows, ncols = std::min<int64_t>(64, N - n0);
    thread_local std::vector<T> panel;
    if (static_cast<int64_t>(panel.size()) < panel_elems) panel.resize(panel_elems);
    PackPanelKN(w, K, N, n0, ncols, panel.data());  // prefetches ahead as it goes
    BlockKNPacked<T, YT>(x, panel.data(), y, K, N, m0, std::min(M, m0 + rows), n0, ncols);
  });
}

// y = x @ W (W [K, N]) for M rows. Unpacked items read W in place and prefetch the next
// item's panel while they compute.
template <typename T, typename YT>
void RunKN(xla::ffi::ThreadPool& pool, const T* x, const T* w, YT* y, int64_t M,
           int64_t K, int64_t N) {
  if (K == 0) {
    std::fill(y, y + M * N, FromF32<YT>(0.0f));
    return;
  }
  if constexpr (kHavePacked<T>) {
    if (PackKN<T>(M, K)) return RunKNPacked<T, YT>(pool, x, w, y, M, K, N);
  }
  int64_t panels = CeilDiv(N, kPanelKN);
  int64_t rows = RowChunk(M, panels, 6, kMaxRowsFor<T>);
  int64_t chunks = CeilDiv(M, rows);
  ParallelForAhead(pool, panels * chunks, [&](int64_t item, int64_t next) {
    int64_t p = item / chunks, c = item % chunks;
    int64_t n0 = p * kPanelKN, m0 = c * rows;
    BlockKN<T, YT>(x, w, y, K, N, m0, std::min(M, m0 + rows), n0,
                   std::min<int64_t>(kPanelKN, N - n0),
                   NextPanel(w, w + 32, N, n0, next < 0 ? -1 : next / chunks * kPanelKN));
  });
}

// y = x @ W^T (W [N, K]) for M rows.
template <typename T, typename YT>
void RunNK(xla::ffi::ThreadPool& pool, const T* x, const T* w, YT* y, int64_t M,
           int64_t K, int64_t N) {
  if (K == 0) {
    std::fill(y, y + M * N, FromF32<YT>(0.0f));
    return;
  }
  if constexpr (kHavePacked<T>) {
    if (M >= (sizeof(T) == 2 ? kPackRowsNKBf16 : kPackRowsNKF32))
      return RunNKPacked<T, YT>(pool, x, w, y, M, K, N);
  }
  int64_t panels = CeilDiv(N, kPanelNK);
  int64_t rows = RowChunk(M, panels, 4, kMaxRowsFor<T>);
  int64_t chunks = CeilDiv(M, rows);
  ParallelFor(pool, panels * chunks, [&](int64_t item) {
    int64_t p = item / chunks, c = item % chunks;
    int64_t n0 = p * kPanelNK, m0 = c * rows;
    BlockNK<T, YT>(x, w, y, K, N, m0, std::min(M, m0 + rows), n0,
                   std::min<int64_t>(N, n0 + kPanelNK));
  });
}

}  // namespace
}  // namespace matmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_GEMM_H_
