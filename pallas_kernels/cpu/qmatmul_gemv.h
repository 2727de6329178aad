// The quantized GEMM for one row of x (a decode step's GEMV, qmatmul.cc): y[0, n0:n1] per
// call, streaming W once. A row of x has no reuse of W, so the panel kernels' shape (16
// columns down all of K) leaves it bound by memory latency: every W row is a new short
// stream (a new page once N reaches 4 KiB, which no hardware prefetcher crosses). Here a
// call reads its K rows left to right across its columns, four K rows at a time where the
// group allows (two int4 byte rows, four int8 ones; else two K rows), accumulating x * q per
// column in a small buffer that stays in L1, and folds the buffer into y with the group's
// scale (and min; float32 or float16) at the end of each group; the W rows two passes ahead
// are prefetched as the current ones are read. AVX2 + FMA (AVX-512 builds run it too);
// needs an even group. JAXSERVE_QMATMUL_GEMV is defined where it is built.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_GEMV_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_GEMV_H_

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>

#include "common.h"
#include "qmatmul_common.h"

namespace jaxserve_cpu {
namespace qmatmul {

constexpr int64_t kGemvChunk = 1024;  // columns per work item, at most (a multiple of 64)
constexpr int64_t kGemvSerial = 1 << 17;  // below this many weights one thread does it all

// Columns per work item for one row over `matrices` [K, N] weights (the gated MLP's two)
// on `workers` threads: an even split (in whole lines of W) up to kGemvChunk; all of N
// where the product is too small to share.
inline int64_t GemvChunk(int64_t K, int64_t N, int64_t workers, int64_t matrices = 1) {
  if (matrices * K * N < kGemvSerial || workers < 2) return std::min(N, kGemvChunk);
  const int64_t share = (N + workers - 1) / workers;
  return std::min(kGemvChunk, std::max<int64_t>(64, (share + 63) / 64 * 64));
}

#if defined(__AVX2__) && defined(__FMA__)
#define JAXSERVE_QMATMUL_GEMV 1

// acc[0, n1 - n0) += sum over j < 2 * P of x[k + j] * q[k + j, n0:n1] (n1 - n0 a multiple
// of 32): P pairs of K rows (P int4 byte rows, 2 P int8 ones) per pass, so that each
// accumulator is loaded and stored once per 2 P rows; the byte rows `ahead` further on are
// prefetched.
template <bool kInt4, bool kMin, int P, typename S>
inline void GemvRows(const Problem<S>& p, int64_t k, int64_t n0, int64_t n1, int64_t ahead,
                     float* acc) {
  constexpr int kByteRows = kInt4 ? P : 2 * P;
  const __m256i nibble = _mm256_set1_epi32(0xF), eight = _mm256_set1_epi32(8);
  __m256 xv[2 * P];
  for (int j = 0; j < 2 * P; ++j) xv[j] = _mm256_broadcast_ss(p.x + k + j);
  const uint8_t* row = p.q + (kInt4 ? k / 2 : k) * p.N;
  for (int64_t n = n0; n < n1; n += 32) {
    if (ahead && n % 64 == 0)
      for (int r = 0; r < kByteRows; ++r) PrefetchL1(row + (ahead + r) * p.N + n);
    float* a = acc + (n - n0);
    for (int c = 0; c < 4; ++c) {
      __m256 sum = _mm256_loadu_ps(a + 8 * c);
      for (int r = 0; r < kByteRows; ++r) {
        const __m128i* at = reinterpret_cast<const __m128i*>(row + r * p.N + n + 8 * c);
        if constexpr (kInt4) {  // 8 bytes: 8 columns of K rows k + 2r (low nibble), k + 2r + 1
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(at));
          __m256i lo = _mm256_and_si256(b, nibble), hi = _mm256_srli_epi32(b, 4);
          if constexpr (!kMin) lo = _mm256_sub_epi32(lo, eight), hi = _mm256_sub_epi32(hi, eight);
          sum = _mm256_fmadd_ps(xv[2 * r], _mm256_cvtepi32_ps(lo), sum);
          sum = _mm256_fmadd_ps(xv[2 * r + 1], _mm256_cvtepi32_ps(hi), sum);
        } else {
          const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(at)));
          sum = _mm256_fmadd_ps(xv[r], w, sum);
        }
      }
      _mm256_storeu_ps(a + 8 * c, sum);
    }
  }
}

// Columns [n0, n1) of row 0 of y (n1 - n0 a multiple of 32, at most kGemvChunk; p.g even);
// xsum: row 0's group sums (kMin). P: pairs of K rows per pass (p.g a multiple of 2 P).
template <bool kInt4, bool kMin, int P, typename S>
void GemvColumnsBy(const Problem<S>& p, const float* xsum, int64_t n0, int64_t n1) {
  alignas(32) float acc[kGemvChunk];
  const int64_t width = n1 - n0, step = kInt4 ? P : 2 * P;  // byte rows per pass
  const int64_t byte_rows = kInt4 ? p.K / 2 : p.K;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    std::memset(acc, 0, sizeof(float) * width);
    for (int64_t k = gi * p.g; k < (gi + 1) * p.g; k += 2 * P) {
      const int64_t byte_row = kInt4 ? k / 2 : k;
      GemvRows<kInt4, kMin, P>(p, k, n0, n1,
                               byte_row + 3 * step <= byte_rows ? 2 * step : 0, acc);
    }
    const S* scale = p.scales + gi * p.N;
    const S* mn = kMin ? p.mins + gi * p.N : nullptr;
    const __m256 s = kMin ? _mm256_broadcast_ss(xsum + gi) : _mm256_setzero_ps();
    for (int64_t n = n0; n < n1; n += 8) {
      __m256 y = gi == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(Out(p, 0, n));
      y = _mm256_fmadd_ps(_mm256_load_ps(acc + (n - n0)), Load8(scale + n), y);
      if constexpr (kMin) y = _mm256_fmadd_ps(s, Load8(mn + n), y);
      _mm256_storeu_ps(Out(p, 0, n), y);
    }
  }
}

template <bool kInt4, bool kMin, typename S>
void GemvColumns(const Problem<S>& p, const float* xsum, int64_t n0, int64_t n1) {
  if (p.g % 4 == 0) {
    GemvColumnsBy<kInt4, kMin, 2>(p, xsum, n0, n1);
  } else {
    GemvColumnsBy<kInt4, kMin, 1>(p, xsum, n0, n1);
  }
}
#endif

}  // namespace qmatmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_GEMV_H_
