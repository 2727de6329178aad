// Packed panels of W for the AVX-512 microkernels, and where packing pays. A panel holds
// 64 output columns contiguously in 32-bit units, [K or ceil(K/2)][64]: columns of W [K, N]
// (PackPanelKN), or rows of W [N, K] transposed (PackPanel32), so that the "nk" product
// runs on the kn microkernels too. The AVX2 path packs its own panels (matmul_avx2.h).

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_PACK_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_PACK_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "matmul_avx512.h"

namespace jaxserve_cpu {
namespace matmul {
namespace {

// Packs `rows` (<= 64) rows of W [N, K], each `row_bytes` long, into a panel
// P[unit][64] of 32-bit units: unit c of a row is its bytes [4c, 4c + 4) -- one float
// (f32, `units` = K) or one K-pair of bf16 (`units` = K / 2). Rows past `rows` are zero.
[[maybe_unused]] void PackPanel32(const char* src, int64_t row_bytes, int64_t rows,
                                  int64_t units, uint32_t* dst) {
  int64_t c = 0;
#ifdef JAXSERVE_AVX512  // Transpose16x16
  if (rows == 64) {
    const int64_t full = units / 16 * 16;
    for (int rb = 0; rb < 4; ++rb)  // 16 rows at a time, each read front to back
      for (c = 0; c < full; c += 16)
        Transpose16x16(src + 16 * rb * row_bytes + 4 * c, row_bytes,
                       reinterpret_cast<char*>(dst + c * 64 + 16 * rb), 256);
    c = full;
  }
#endif
  for (; c < units; ++c)
    for (int64_t r = 0; r < 64; ++r) {
      uint32_t v = 0;
      if (r < rows) std::memcpy(&v, src + r * row_bytes + 4 * c, 4);
      dst[c * 64 + r] = v;
    }
}

// Packs columns [n0, n0 + ncols) (ncols <= 64) of W [K, N] into a panel like PackPanel32's:
// f32 [K][64]; bf16 [ceil(K/2)][64][2], each K-pair of rows interleaved (the odd last row
// pairs with 0). Columns past ncols are zero.
[[maybe_unused]] void PackPanelKN(const float* w, int64_t K, int64_t N, int64_t n0,
                                  int64_t ncols, float* dst) {
  for (int64_t k = 0; k < K; ++k) {
#ifdef JAXSERVE_AVX512
    for (int64_t c = 0; kPrefetchPack > 0 && c < ncols; c += 16)
      _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetchPack) * N + n0 + c),
                   _MM_HINT_T0);
#endif
    std::memcpy(dst + k * 64, w + k * N + n0, ncols * sizeof(float));
    std::memset(dst + k * 64 + ncols, 0, (64 - ncols) * sizeof(float));
  }
}

// bf16: panel columns [0, 32) are `na` columns from `a`, [32, 64) are `nb` from `b` (rows
// of both N apart): columns n0.. and n0 + 32.. of one W, or (gated) the same 32 columns
// of the gate's and the up projection's W.
[[maybe_unused]] void PackPanelKN2(const uint16_t* a, int64_t na, const uint16_t* b,
                                   int64_t nb, int64_t K, int64_t N, uint16_t* dst) {
  for (int64_t k = 0; k < K; k += 2) {
    const bool pair = k + 1 < K;
    uint16_t* d = dst + k * 64;
    for (int h = 0; h < 2; ++h) {
      const uint16_t* r0 = (h == 0 ? a : b) + k * N;
      const int64_t n = h == 0 ? na : nb;
      uint16_t* dh = d + 64 * h;
#ifdef JAXSERVE_AVX512
      const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                          40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
                                          1, 32, 0);
      const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
      const __mmask32 mk = Mask32(std::max<int64_t>(n, 0));
      if (kPrefetchPack > 0) {
        _mm_prefetch(reinterpret_cast<const char*>(r0 + kPrefetchPack * N), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(r0 + (kPrefetchPack + 1) * N), _MM_HINT_T0);
      }
      __m512i x0 = _mm512_maskz_loadu_epi16(mk, r0);
      __m512i x1 = pair ? _mm512_maskz_loadu_epi16(mk, r0 + N) : _mm512_setzero_si512();
      _mm512_storeu_si512(dh, _mm512_permutex2var_epi16(x0, lo, x1));
      _mm512_storeu_si512(dh + 32, _mm512_permutex2var_epi16(x0, hi, x1));
#else
      for (int64_t j = 0; j < 32; ++j) {
        dh[2 * j] = j < n ? r0[j] : 0;
        dh[2 * j + 1] = (j < n && pair) ? r0[N + j] : 0;
      }
#endif
    }
  }
}

[[maybe_unused]] void PackPanelKN(const uint16_t* w, int64_t K, int64_t N, int64_t n0,
                                  int64_t ncols, uint16_t* dst) {
  const uint16_t* a = w + n0;
  PackPanelKN2(a, std::min<int64_t>(32, ncols), ncols > 32 ? a + 32 : a, ncols - 32, K, N,
               dst);
}

// The nk product for M >= kPackRowsNK*: each item transposes a 64-row panel of W into the
// kn layout once (a thread-local buffer) and runs the kn microkernels on it, so no
// horizontal reductions are needed. Below, the product is bound by reading W and the
// dot-product kernels do as well (f32) or better.
constexpr int64_t kPackRowsNKBf16 = 16;
constexpr int64_t kPackRowsNKF32 = 64;

// Whether the kn product packs each item's 64-column panel of W first (contiguous, and for
// bf16 K-pair interleaved once instead of once per row block): for bf16 at M >= 256 or
// long K, for f32 only at both; with few rows and a short K the packing costs more than
// it saves.
template <typename T>
bool PackKN(int64_t M, int64_t K) {
  if (sizeof(T) == 2) return M >= 256 || (K >= 1024 && M >= 32);
  return M >= 256 && K >= 1024;
}

}  // namespace
}  // namespace matmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_PACK_H_
