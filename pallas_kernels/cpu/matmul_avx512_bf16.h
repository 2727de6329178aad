// The AVX-512 path of matmul.cc for bfloat16 where the target has AVX512_BF16
// (JAXSERVE_AVX512BF16): vdpbf16ps multiplies bf16 pairs exactly and sums them in float32.
//
// "kn" (W [K, N]): microkernels of up to 6 rows x 64 columns on K-pairs: two W rows are
// interleaved in registers (unpacklo/hi_epi16) and the resulting column permutation is
// undone once at the store; a packed panel (matmul_pack.h) has its K-pairs interleaved
// already. An odd last K pairs with zeros. "nk" (W [N, K]) with few rows: dot products
// along K, 32 bf16 per instruction, as the float32 kernels of matmul_avx512.h.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_AVX512_BF16_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_AVX512_BF16_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "matmul_avx512.h"

namespace jaxserve_cpu {
namespace matmul {
namespace {

#ifdef JAXSERVE_AVX512BF16

inline __m512i BroadcastPair(const uint16_t* p) {  // (p[0], p[1]) in every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline void StoreBf16(uint16_t* dst, __m512 v, int64_t n) {  // n of the 16 lanes
  __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  if (n >= 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
  } else if (n > 0) {
    _mm256_mask_storeu_epi16(dst, Mask16(n), h);
  }
}
inline void StoreOut(uint16_t* dst, __m512 v, int64_t n) { StoreBf16(dst, v, n); }
inline void StoreOut(float* dst, __m512 v, int64_t n) {  // n of the 16 lanes
  if (n >= 16) {
    _mm512_storeu_ps(dst, v);
  } else if (n > 0) {
    _mm512_mask_storeu_ps(dst, Mask16(n), v);
  }
}

// bf16, W [K, N]: MR rows x NG*32 columns. For a K-pair, rows k and k+1 of a 32-column
// group interleave into `lo` (columns 0-3, 8-11, 16-19, 24-27) and `hi` (4-7, ...).
// kPacked: W is a packed panel instead, [ceil(K/2)][64 columns][2] (see PackPanelKN), whose
// pair rows load as they are, in natural column order. y is bf16 or (YT = float) float32.
// kGated (NG = 2): group 0 is columns [0, 32) of `w` (the gate), group 1 the same columns
// of `w2` (up; packed: panel columns [32, 64)), both masked to `ncols` <= 32; the result is
// silu(gate) * up, 32 columns.
template <int MR, int NG, bool kPacked = false, typename YT = uint16_t, bool kGated = false>
__attribute__((always_inline)) inline void UkrBf16KN(const uint16_t* x, int64_t ldx,
                                                     const uint16_t* w, int64_t ldw,
                                                     YT* y, int64_t ldy, int64_t K,
                                                     int64_t ncols,
                                                     const uint16_t* w2 = nullptr,
                                                     const Prefetch& pf = Prefetch()) {
  static_assert(!kGated || NG == 2, "the gated kernel has two 32-column groups");
  __m512 acc[MR][2 * NG];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int v = 0; v < 2 * NG; ++v) acc[r][v] = _mm512_setzero_ps();
  const __mmask32 last = Mask32(kGated ? ncols : ncols - 32 * (NG - 1));
  const uint16_t* src[NG];
  #pragma GCC unroll 16
  for (int g = 0; g < NG; ++g) src[g] = kGated ? (g == 0 ? w : w2) : w + 32 * g;
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    __m512i b[2 * NG];
    if (!kPacked) PrefetchStep(pf, k / 2, 1);
    #pragma GCC unroll 16
    for (int g = 0; kPacked && g < 2 * NG; ++g) b[g] = _mm512_loadu_si512(w + k * 64 + 32 * g);
    #pragma GCC unroll 16
    for (int g = 0; !kPacked && g < NG; ++g) {
      const uint16_t* w0 = src[g] + k * ldw;
      if (pf.ahead > 0) {
        _mm_prefetch(reinterpret_cast<const char*>(w0 + pf.ahead * ldw), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w0 + (pf.ahead + 1) * ldw), _MM_HINT_T0);
      }
      __m512i r0, r1;
      if (!kGated && g < NG - 1) {
        r0 = _mm512_loadu_si512(w0);
        r1 = _mm512_loadu_si512(w0 + ldw);
      } else {
        r0 = _mm512_maskz_loadu_epi16(last, w0);
        r1 = _mm512_maskz_loadu_epi16(last, w0 + ldw);
      }
      b[2 * g] = _mm512_unpacklo_epi16(r0, r1);
      b[2 * g + 1] = _mm512_unpackhi_epi16(r0, r1);
    }
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      __m512bh a = (__m512bh)BroadcastPair(x + r * ldx + k);
      #pragma GCC unroll 16
      for (int v = 0; v < 2 * NG; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, (__m512bh)b[v]);
    }
  }
  if (k < K) {  // odd K: the last row pairs with zeros
    __m512i zero = _mm512_setzero_si512();
    __m512i b[2 * NG];
    #pragma GCC unroll 16
    for (int g = 0; kPacked && g < 2 * NG; ++g) b[g] = _mm512_loadu_si512(w + k * 64 + 32 * g);
    #pragma GCC unroll 16
    for (int g = 0; !kPacked && g < NG; ++g) {
      const uint16_t* w0 = src[g] + k * ldw;
      __m512i r0 = (!kGated && g < NG - 1) ? _mm512_loadu_si512(w0)
                                           : _mm512_maskz_loadu_epi16(last, w0);
      b[2 * g] = _mm512_unpacklo_epi16(r0, zero);
      b[2 * g + 1] = _mm512_unpackhi_epi16(r0, zero);
    }
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[r * ldx + k]));
      #pragma GCC unroll 16
      for (int v = 0; v < 2 * NG; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, (__m512bh)b[v]);
    }
  }
  const __m512i idx0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i idx1 =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    __m512 c[2 * NG];  // columns in natural order, 16 per vector
    #pragma GCC unroll 16
    for (int g = 0; g < NG; ++g) {
      c[2 * g] = kPacked ? acc[r][2 * g]
                         : _mm512_permutex2var_ps(acc[r][2 * g], idx0, acc[r][2 * g + 1]);
      c[2 * g + 1] = kPacked ? acc[r][2 * g + 1]
                             : _mm512_permutex2var_ps(acc[r][2 * g], idx1, acc[r][2 * g + 1]);
    }
    if (kGated) {
      StoreOut(y + r * ldy, SiluMul(c[0], c[2]), ncols);
      StoreOut(y + r * ldy + 16, SiluMul(c[1], c[3]), ncols - 16);
    } else {
      #pragma GCC unroll 16
      for (int g = 0; g < NG; ++g) {
        int64_t n = g < NG - 1 ? 32 : ncols - 32 * (NG - 1);
        StoreOut(y + r * ldy + 32 * g, c[2 * g], n);
        StoreOut(y + r * ldy + 32 * g + 16, c[2 * g + 1], n - 16);
      }
    }
  }
}

template <int MR, bool kPacked, typename YT, bool kGated>
inline void DispatchBf16KN(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw,
                           YT* y, int64_t ldy, int64_t K, int64_t ncols, const uint16_t* w2,
                           const Prefetch& pf) {
  if (kGated || ncols > 32)
    return UkrBf16KN<MR, 2, kPacked, YT, kGated>(x, ldx, w, ldw, y, ldy, K, ncols, w2, pf);
  return UkrBf16KN<MR, 1, kPacked, YT>(x, ldx, w, ldw, y, ldy, K, ncols, nullptr, pf);
}

// Rows [m0, m1) x columns [n0, n0 + ncols) of y; kPacked: `w` is the panel of n0 (ldw
// unused). kGated: silu(x @ w) * (x @ w2) for ncols <= 32 (packed: both in `w`'s panel).
// ldy > 0: y is instead a buffer of the item's columns only, row m at y + m * ldy.
template <bool kPacked = false, typename YT = uint16_t, bool kGated = false>
inline void BlockBf16KN(const uint16_t* x, const uint16_t* w, YT* y, int64_t K,
                        int64_t N, int64_t m0, int64_t m1, int64_t n0, int64_t ncols,
                        const uint16_t* w2 = nullptr, const Prefetch& pf = Prefetch(),
                        int64_t ldy = 0) {
  if (ldy <= 0) {
    y += n0;
    ldy = N;
  }
  const uint16_t* wp = kPacked ? w : w + n0;
  const uint16_t* wp2 = (kGated && !kPacked) ? w2 + n0 : nullptr;
  const int64_t steps = K / 2;  // K-pair steps per pass
  int64_t pass = 0;
  for (int64_t m = m0; m < m1; m += kMrKN, ++pass) {
    Prefetch p = PassPrefetch(pf, pass, steps, K, (!kPacked && m == m0) ? kPrefetchBf16 : 0);
    const uint16_t* xs = x + m * K;
    YT* ys = y + m * ldy;
    switch (std::min<int64_t>(m1 - m, kMrKN)) {
      case 1: DispatchBf16KN<1, kPacked, YT, kGated>(xs, K, wp, N, ys, ldy, K, ncols, wp2, p); break;
      case 2: DispatchBf16KN<2, kPacked, YT, kGated>(xs, K, wp, N, ys, ldy, K, ncols, wp2, p); break;
      case 3: DispatchBf16KN<3, kPacked, YT, kGated>(xs, K, wp, N, ys, ldy, K, ncols, wp2, p); break;
      case 4: DispatchBf16KN<4, kPacked, YT, kGated>(xs, K, wp, N, ys, ldy, K, ncols, wp2, p); break;
      case 5: DispatchBf16KN<5, kPacked, YT, kGated>(xs, K, wp, N, ys, ldy, K, ncols, wp2, p); break;
      default:
        DispatchBf16KN<kMrKN, kPacked, YT, kGated>(xs, K, wp, N, ys, ldy, K, ncols, wp2, p);
        break;
    }
  }
}

// bf16, W [N, K]: dot products along K, 32 bf16 (16 pairs) per vdpbf16ps.
template <int MR, int NR, typename YT>
__attribute__((always_inline)) inline void UkrBf16NK(const uint16_t* x, int64_t ldx,
                                                     const uint16_t* w, int64_t ldw,
                                                     YT* y, int64_t ldy, int64_t K) {
  __m512 acc[MR][NR];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh a[MR];
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = (__m512bh)_mm512_loadu_si512(x + r * ldx + k);
    #pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) {
      __m512i bi = _mm512_loadu_si512(w + c * ldw + k);
      __asm__("" : "+v"(bi));  // one load per W vector, not one per operand
      __m512bh b = (__m512bh)bi;
      #pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a[r], b);
    }
  }
  if (k < K) {
    const __mmask32 mk = Mask32(K - k);
    __m512bh a[MR];
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = (__m512bh)_mm512_maskz_loadu_epi16(mk, x + r * ldx + k);
    #pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) {
      __m512bh b = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + c * ldw + k);
      #pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a[r], b);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) y[r * ldy + c] = FromF32<YT>(_mm512_reduce_add_ps(acc[r][c]));
}

template <int MR, typename YT>
inline void DispatchBf16NK(const uint16_t* x, const uint16_t* w, YT* y, int64_t K,
                           int64_t N, int64_t nrows) {
  switch (nrows) {
    case 1: return UkrBf16NK<MR, 1>(x, K, w, K, y, N, K);
    case 2: return UkrBf16NK<MR, 2>(x, K, w, K, y, N, K);
    case 3: return UkrBf16NK<MR, 3>(x, K, w, K, y, N, K);
    case 4: return UkrBf16NK<MR, 4>(x, K, w, K, y, N, K);
    case 5: return UkrBf16NK<MR, 5>(x, K, w, K, y, N, K);
    default: return UkrBf16NK<MR, 6>(x, K, w, K, y, N, K);
  }
}

template <typename YT>
inline void BlockBf16NK(const uint16_t* x, const uint16_t* w, YT* y, int64_t K,
                        int64_t N, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kNrNK) {
    int64_t nr = std::min<int64_t>(kNrNK, n1 - n);
    const uint16_t* wn = w + n * K;
    int64_t m = m0;
    for (; m + kMrNK <= m1; m += kMrNK)
      DispatchBf16NK<kMrNK>(x + m * K, wn, y + m * N + n, K, N, nr);
    switch (m1 - m) {
      case 1: DispatchBf16NK<1>(x + m * K, wn, y + m * N + n, K, N, nr); break;
      case 2: DispatchBf16NK<2>(x + m * K, wn, y + m * N + n, K, N, nr); break;
      case 3: DispatchBf16NK<3>(x + m * K, wn, y + m * N + n, K, N, nr); break;
      default: break;
    }
  }
}

#endif  // JAXSERVE_AVX512BF16

}  // namespace
}  // namespace matmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_AVX512_BF16_H_
