// One block of a product of the matmul kernels -- rows [m0, m1) x a panel of columns -- on
// the code path the target has (see matmul_common.h). The drivers (matmul_gemm.h,
// matmul_gated.h, matmul_argmax.h) split their products into such blocks. T is the
// operands' type (float or uint16_t = bf16), YT the result's (T, or float for bf16
// operands).

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_BLOCKS_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_BLOCKS_H_

#include <cstdint>
#include <type_traits>

#include "matmul_avx2.h"
#include "matmul_avx512_bf16.h"
#include "matmul_scalar.h"

namespace jaxserve_cpu {
namespace matmul {
namespace {

#ifdef JAXSERVE_AVX2
// BlockKN on the AVX2 path (matmul_avx2.h); ncols <= 64.
template <typename T, typename YT>
void Avx2KN(const T* x, const T* w, YT* y, int64_t K, int64_t N, int64_t m0, int64_t m1,
            int64_t n0, int64_t ncols, int64_t ldy) {
  YT* ys = ldy > 0 ? y + m0 * ldy : y + m0 * N + n0;
  avx2::Item<T, YT, false, false>(x + m0 * K, w + n0, nullptr, K, N, m1 - m0, ncols, ys,
                                  ldy > 0 ? ldy : N);
}
#endif

// Rows [m0, m1) x columns [n0, n0 + ncols) of y = x @ W (W [K, N]); ldy > 0: y is a
// buffer of those columns only, row m at y + m * ldy.
template <typename T, typename YT>
void BlockKN(const T* x, const T* w, YT* y, int64_t K, int64_t N, int64_t m0, int64_t m1,
             int64_t n0, int64_t ncols, [[maybe_unused]] const Prefetch& pf,
             int64_t ldy = 0) {
  if constexpr (std::is_same_v<T, float>) {
#ifdef JAXSERVE_AVX512
    return BlockF32KN(x, w, y, K, N, m0, m1, n0, ncols, nullptr, pf, ldy);
#elif defined(JAXSERVE_AVX2)
    return Avx2KN(x, w, y, K, N, m0, m1, n0, ncols, ldy);
#endif
  } else {
#ifdef JAXSERVE_AVX512BF16
    return BlockBf16KN<false, YT>(x, w, y, K, N, m0, m1, n0, ncols, nullptr, pf, ldy);
#elif defined(JAXSERVE_AVX2)
    return Avx2KN(x, w, y, K, N, m0, m1, n0, ncols, ldy);
#endif
  }
  ScalarBlock<T, YT, false>(x, w, y, K, N, m0, m1, n0, n0 + ncols, ldy);
}

// Rows [m0, m1) x columns [n0, n1) of y = x @ W^T (W [N, K]).
template <typename T, typename YT>
void BlockNK(const T* x, const T* w, YT* y, int64_t K, int64_t N, int64_t m0, int64_t m1,
             int64_t n0, int64_t n1) {
  if constexpr (std::is_same_v<T, float>) {
#ifdef JAXSERVE_AVX512
    return BlockF32NK(x, w, y, K, N, m0, m1, n0, n1);
#elif defined(JAXSERVE_AVX2)
    return avx2::NKBlock(x + m0 * K, w + n0 * K, y + m0 * N + n0, K, m1 - m0, n1 - n0, N);
#endif
  } else {
#ifdef JAXSERVE_AVX512BF16
    return BlockBf16NK<YT>(x, w, y, K, N, m0, m1, n0, n1);
#elif defined(JAXSERVE_AVX2)
    return avx2::NKBlock(x + m0 * K, w + n0 * K, y + m0 * N + n0, K, m1 - m0, n1 - n0, N);
#endif
  }
  ScalarBlock<T, YT, true>(x, w, y, K, N, m0, m1, n0, n1);
}

// The kn microkernels on a packed panel (see PackPanel32), where the SIMD kernels exist.
template <typename T>
constexpr bool kHavePacked = false;
#ifdef JAXSERVE_AVX512
template <>
constexpr bool kHavePacked<float> = true;
#endif
#ifdef JAXSERVE_AVX512BF16
template <>
constexpr bool kHavePacked<uint16_t> = true;
#endif

template <typename T, typename YT>
void BlockKNPacked(const T* x, const T* w, YT* y, int64_t K, int64_t N, int64_t m0,
                   int64_t m1, int64_t n0, int64_t ncols,
                   [[maybe_unused]] const Prefetch& pf = Prefetch(),
                   [[maybe_unused]] int64_t ldy = 0) {
  if constexpr (std::is_same_v<T, float>) {
#ifdef JAXSERVE_AVX512
    BlockF32KN<true>(x, w, y, K, N, m0, m1, n0, ncols, nullptr, pf, ldy);
#endif
  } else {
#ifdef JAXSERVE_AVX512BF16
    BlockBf16KN<true, YT>(x, w, y, K, N, m0, m1, n0, ncols, nullptr, pf, ldy);
#endif
  }
}

// The Prefetch of an item whose next item (-1: none) covers columns [next_n0, ...) of
// `a` and `b` (W [K, N]), unless it is the same panel (`n0`) again.
template <typename T>
Prefetch NextPanel(const T* a, const T* b, int64_t N, int64_t n0, int64_t next_n0) {
  Prefetch pf;
  if (!kPrefetchNext || next_n0 < 0 || next_n0 == n0) return pf;
  pf.next0 = reinterpret_cast<const char*>(a + next_n0);
  pf.next1 = reinterpret_cast<const char*>(b + next_n0);
  pf.ld = N * static_cast<int64_t>(sizeof(T));
  pf.rows = 1;  // any: PassPrefetch sets each pass's rows
  return pf;
}

}  // namespace
}  // namespace matmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_BLOCKS_H_
