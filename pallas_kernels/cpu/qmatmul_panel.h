// The quantized GEMM's SIMD micro-kernels for any M (qmatmul.cc): one 16-column panel of
// up to kMr rows of x at a time, AVX-512 (one vector per row) or AVX2 + FMA (two); float32
// or float16 scales (widened as they are read).
// JAXSERVE_QMATMUL_SIMD is defined where one of them is built.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_PANEL_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_PANEL_H_

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "qmatmul_common.h"

namespace jaxserve_cpu {
namespace qmatmul {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// One 16-column panel: rows [m0, m0 + MR), one zmm per row.
template <int MR, bool kInt4, bool kMin, typename S>
void Panel(const Problem<S>& p, const float* xsum, int64_t m0, int64_t n0) {
  __m512 out[MR];
  for (int m = 0; m < MR; ++m) out[m] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m512 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    const int64_t k0 = gi * p.g;
    if constexpr (kInt4) {
      for (int64_t k = k0; k < k0 + p.g; k += 2) {
        const __m128i bytes =
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.q + (k / 2) * p.N + n0));
        const __m512i b = _mm512_cvtepu8_epi32(bytes);
        __m512i lo = _mm512_and_si512(b, nibble), hi = _mm512_srli_epi32(b, 4);
        if constexpr (!kMin) lo = _mm512_sub_epi32(lo, eight), hi = _mm512_sub_epi32(hi, eight);
        const __m512 wl = _mm512_cvtepi32_ps(lo), wh = _mm512_cvtepi32_ps(hi);
        for (int m = 0; m < MR; ++m) {
          const float* xr = p.x + (m0 + m) * p.K + k;
          acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(xr[0]), wl, acc[m]);
          acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(xr[1]), wh, acc[m]);
        }
      }
    } else {
      for (int64_t k = k0; k < k0 + p.g; ++k) {
        const __m128i bytes =
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.q + k * p.N + n0));
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
        for (int m = 0; m < MR; ++m)
          acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(p.x[(m0 + m) * p.K + k]), w, acc[m]);
      }
    }
    const __m512 scale = Load16(p.scales + gi * p.N + n0);
    for (int m = 0; m < MR; ++m) out[m] = _mm512_fmadd_ps(acc[m], scale, out[m]);
    if constexpr (kMin) {
      const __m512 mn = Load16(p.mins + gi * p.N + n0);
      for (int m = 0; m < MR; ++m)
        out[m] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[(m0 + m) * p.G + gi]), mn, out[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(Out(p, m0 + m, n0), out[m]);
}
#define JAXSERVE_QMATMUL_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
// One 16-column panel: rows [m0, m0 + MR), two ymm per row.
template <int MR, bool kInt4, bool kMin, typename S>
void Panel(const Problem<S>& p, const float* xsum, int64_t m0, int64_t n0) {
  __m256 out[MR][2];
  for (int m = 0; m < MR; ++m) out[m][0] = out[m][1] = _mm256_setzero_ps();
  const __m256i nibble = _mm256_set1_epi32(0xF), eight = _mm256_set1_epi32(8);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m256 acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    const int64_t k0 = gi * p.g;
    if constexpr (kInt4) {
      for (int64_t k = k0; k < k0 + p.g; k += 2) {
        const __m128i bytes =
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.q + (k / 2) * p.N + n0));
        __m256 wl[2], wh[2];
        for (int c = 0; c < 2; ++c) {
          const __m256i b = _mm256_cvtepu8_epi32(c ? _mm_srli_si128(bytes, 8) : bytes);
          __m256i lo = _mm256_and_si256(b, nibble), hi = _mm256_srli_epi32(b, 4);
          if constexpr (!kMin) lo = _mm256_sub_epi32(lo, eight), hi = _mm256_sub_epi32(hi, eight);
          wl[c] = _mm256_cvtepi32_ps(lo);
          wh[c] = _mm256_cvtepi32_ps(hi);
        }
        for (int m = 0; m < MR; ++m) {
          const float* xr = p.x + (m0 + m) * p.K + k;
          const __m256 xa = _mm256_broadcast_ss(xr), xb = _mm256_broadcast_ss(xr + 1);
          for (int c = 0; c < 2; ++c) {
            acc[m][c] = _mm256_fmadd_ps(xa, wl[c], acc[m][c]);
            acc[m][c] = _mm256_fmadd_ps(xb, wh[c], acc[m][c]);
          }
        }
      }
    } else {
      for (int64_t k = k0; k < k0 + p.g; ++k) {
        const __m128i bytes =
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.q + k * p.N + n0));
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
        for (int m = 0; m < MR; ++m) {
          const __m256 xv = _mm256_broadcast_ss(p.x + (m0 + m) * p.K + k);
          acc[m][0] = _mm256_fmadd_ps(xv, w0, acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(xv, w1, acc[m][1]);
        }
      }
    }
    for (int c = 0; c < 2; ++c) {
      const __m256 scale = Load8(p.scales + gi * p.N + n0 + 8 * c);
      for (int m = 0; m < MR; ++m) out[m][c] = _mm256_fmadd_ps(acc[m][c], scale, out[m][c]);
      if constexpr (kMin) {
        const __m256 mn = Load8(p.mins + gi * p.N + n0 + 8 * c);
        for (int m = 0; m < MR; ++m)
          out[m][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(xsum + (m0 + m) * p.G + gi), mn,
                                      out[m][c]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 2; ++c) _mm256_storeu_ps(Out(p, m0 + m, n0 + 8 * c), out[m][c]);
}
#define JAXSERVE_QMATMUL_SIMD 1
#endif

}  // namespace qmatmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_PANEL_H_
