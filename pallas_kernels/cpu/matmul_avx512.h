// The AVX-512 path of matmul.cc for float32 (JAXSERVE_AVX512), and the helpers that the
// bfloat16 kernels (matmul_avx512_bf16.h) share with it.
//
// "kn" (W [K, N]): register-blocked microkernels of up to 6 rows x 64 columns (24 zmm
// accumulators, W streamed row by row, x broadcast), K in blocks of 512, reading W in place
// or a packed panel (matmul_pack.h); the gated kernel keeps the gate's and up's
// accumulators of 32 columns and writes silu(gate) * up. "nk" (W [N, K]) with few rows,
// where reading W bounds the product: 4 x rows x 6 W rows accumulated along K, reduced
// horizontally at the end (with more rows the driver packs W's panels transposed, with
// Transpose16x16, and runs the kn microkernels). Tails in M, N and K take smaller
// instantiations and masked loads.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_AVX512_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_AVX512_H_

#include <algorithm>
#include <cstdint>

#include "matmul_common.h"

#ifdef JAXSERVE_AVX512
#include <immintrin.h>
#endif

namespace jaxserve_cpu {
namespace matmul {
namespace {

#ifdef JAXSERVE_AVX512

// The microkernels keep their accumulators in arrays indexed by constant-bound loops; the
// `#pragma GCC unroll` on every such loop lets GCC keep them in zmm registers (without it
// g++ 12 stores all of them to the stack and reloads them on every K step).

inline __mmask16 Mask16(int64_t n) {  // low min(n, 16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}
inline __mmask32 Mask32(int64_t n) {
  return n >= 32 ? static_cast<__mmask32>(0xffffffffu)
                 : static_cast<__mmask32>((1ull << n) - 1ull);
}
inline __mmask16 Mask16Z(int64_t n) { return n <= 0 ? 0 : Mask16(n); }  // n may be <= 0

// silu(g) * u = g / (1 + exp(-g)) * u, in float32.
inline __m512 SiluMul(__m512 g, __m512 u) {
  __m512 e = Exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

// K-step s's share of the next panel (see Prefetch): `lines` cache lines at each of next0
// and next1, row s.
inline void PrefetchStep(const Prefetch& pf, int64_t s, int lines) {
  if (s < pf.rows) {
    const char* a = pf.next0 + s * pf.ld;
    const char* b = pf.next1 + s * pf.ld;
    _mm_prefetch(a, _MM_HINT_T0);
    _mm_prefetch(b, _MM_HINT_T0);
    if (lines > 1) {
      _mm_prefetch(a + 64, _MM_HINT_T0);
      _mm_prefetch(b + 64, _MM_HINT_T0);
    }
  }
}

// ---------------------------------------------------------------------------------------
// f32, W [K, N]: MR rows x NV*16 columns; the last vector is masked to `ncols`.
// kGated (NV = 4): vectors 0-1 are columns [0, 32) of `w` (the gate), 2-3 the same
// columns of `w2` (up), each masked to `ncols` <= 32; y = silu(gate) * up, 32 columns.

// accumulate: add to y's values (a later K block) instead of overwriting them.
template <int MR, int NV, bool kGated = false, bool kPf = true>
__attribute__((always_inline)) inline void UkrF32KN(const float* x, int64_t ldx,
                                                    const float* w, int64_t ldw, float* y,
                                                    int64_t ldy, int64_t K, int64_t ncols,
                                                    bool accumulate,
                                                    const float* w2 = nullptr,
                                                    const Prefetch& pf = Prefetch()) {
  static_assert(!kGated || NV == 4, "the gated kernel has 2 + 2 vectors");
  __m512 acc[MR][NV];
  __mmask16 mask[NV];
  const float* src[NV];
  #pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    if (kGated) {
      mask[v] = Mask16Z(ncols - 16 * (v & 1));
      src[v] = (v < 2 ? w : w2) + 16 * (v & 1);
    } else {
      mask[v] = v < NV - 1 ? static_cast<__mmask16>(0xffff) : Mask16(ncols - 16 * (NV - 1));
      src[v] = w + 16 * v;
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      acc[r][v] = (!kGated && accumulate) ? _mm512_maskz_loadu_ps(mask[v], y + r * ldy + 16 * v)
                                          : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    #pragma GCC unroll 16
    for (int v = 0; kPf && v < NV; ++v)
      if (pf.ahead > 0)
        _mm_prefetch(reinterpret_cast<const char*>(src[v] + (k + pf.ahead) * ldw), _MM_HINT_T0);
    if (kPf) PrefetchStep(pf, k, 2);
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      b[v] = (!kGated && v < NV - 1) ? _mm512_loadu_ps(src[v] + k * ldw)
                                     : _mm512_maskz_loadu_ps(mask[v], src[v] + k * ldw);
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      __m512 a = _mm512_set1_ps(x[r * ldx + k]);
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (kGated) {
      #pragma GCC unroll 16
      for (int v = 0; v < 2; ++v)
        _mm512_mask_storeu_ps(y + r * ldy + 16 * v, mask[v], SiluMul(acc[r][v], acc[r][v + 2]));
    } else {
      #pragma GCC unroll 16
      for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(y + r * ldy + 16 * v, acc[r][v]);
      _mm512_mask_storeu_ps(y + r * ldy + 16 * (NV - 1), mask[NV - 1], acc[r][NV - 1]);
    }
  }
}

template <int MR, bool kGated, bool kPf>
inline void DispatchF32KN(const float* x, int64_t ldx, const float* w, int64_t ldw,
                          float* y, int64_t ldy, int64_t K, int64_t ncols, bool accumulate,
                          const float* w2, const Prefetch& pf) {
  if (kGated)
    return UkrF32KN<MR, 4, true, kPf>(x, ldx, w, ldw, y, ldy, K, ncols, false, w2, pf);
  switch (CeilDiv(ncols, 16)) {
    case 1: return UkrF32KN<MR, 1, false, kPf>(x, ldx, w, ldw, y, ldy, K, ncols, accumulate, w2, pf);
    case 2: return UkrF32KN<MR, 2, false, kPf>(x, ldx, w, ldw, y, ldy, K, ncols, accumulate, w2, pf);
    case 3: return UkrF32KN<MR, 3, false, kPf>(x, ldx, w, ldw, y, ldy, K, ncols, accumulate, w2, pf);
    default: return UkrF32KN<MR, 4, false, kPf>(x, ldx, w, ldw, y, ldy, K, ncols, accumulate, w2, pf);
  }
}

constexpr int64_t kKcF32 = 512;  // K block: 6 x rows (12 KiB) stay in L1 under the W stream

// Rows [m0, m1) x columns [n0, n0 + ncols) of y; kPacked: `w` is the panel of n0, [K][64].
// K is taken in blocks of kKcF32, later blocks adding to y. kGated: y = silu(x @ w) *
// (x @ w2) for ncols <= 32, K in one block (the epilogue needs the whole sums).
// `pf`: the next item's panel (see Prefetch), spread over this item's passes.
// ldy > 0: y is instead a buffer of the item's columns only, row m at y + m * ldy.
template <bool kPacked = false, bool kGated = false>
inline void BlockF32KN(const float* x, const float* w, float* y, int64_t K, int64_t N,
                       int64_t m0, int64_t m1, int64_t n0, int64_t ncols,
                       const float* w2 = nullptr, const Prefetch& pf = Prefetch(),
                       int64_t ldy = 0) {
  static_assert(!(kPacked && kGated), "no packed gated f32 kernel");
  const int64_t ldw = kPacked ? 64 : N;
  if (ldy <= 0) {
    y += n0;
    ldy = N;
  }
  const int64_t kcb = kGated ? K : kKcF32;
  int64_t pass = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kcb) {
    const int64_t kc = std::min<int64_t>(kcb, K - k0);
    const bool acc = k0 > 0;
    const float* wp = (kPacked ? w : w + n0) + k0 * ldw;
    const float* wp2 = kGated ? w2 + n0 + k0 * ldw : nullptr;
    for (int64_t m = m0; m < m1; m += kMrKN, ++pass) {
      Prefetch p = PassPrefetch(pf, pass, kcb, K, (!kPacked && m == m0) ? kPrefetchF32 : 0);
      p.rows = std::min(p.rows, kc);
      const float* xs = x + m * K + k0;
      float* ys = y + m * ldy;
      switch (std::min<int64_t>(m1 - m, kMrKN)) {
        case 1: DispatchF32KN<1, kGated, !kPacked>(xs, K, wp, ldw, ys, ldy, kc, ncols, acc, wp2, p); break;
        case 2: DispatchF32KN<2, kGated, !kPacked>(xs, K, wp, ldw, ys, ldy, kc, ncols, acc, wp2, p); break;
        case 3: DispatchF32KN<3, kGated, !kPacked>(xs, K, wp, ldw, ys, ldy, kc, ncols, acc, wp2, p); break;
        case 4: DispatchF32KN<4, kGated, !kPacked>(xs, K, wp, ldw, ys, ldy, kc, ncols, acc, wp2, p); break;
        case 5: DispatchF32KN<5, kGated, !kPacked>(xs, K, wp, ldw, ys, ldy, kc, ncols, acc, wp2, p); break;
        default:
          DispatchF32KN<kMrKN, kGated, !kPacked>(xs, K, wp, ldw, ys, ldy, kc, ncols, acc, wp2, p);
          break;
      }
    }
  }
}

// dst[c][r] = src[r][c] for a 16 x 16 block of 32-bit units; strides in bytes.
inline void Transpose16x16(const char* src, int64_t lds, char* dst, int64_t ldd) {
  __m512 r[16], t[16];
  #pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  #pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  #pragma GCC unroll 16
  for (int i = 0; i < 4; ++i) {  // r[4i + j], 128-bit chunk q: rows 4i..4i+3 of column 4q + j
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  #pragma GCC unroll 16
  for (int j = 0; j < 4; ++j) {
    __m512 a = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    __m512 b = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    __m512 c = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    __m512 d = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    _mm512_storeu_ps(dst + (0 + j) * ldd, _mm512_shuffle_f32x4(a, c, 0x88));
    _mm512_storeu_ps(dst + (8 + j) * ldd, _mm512_shuffle_f32x4(a, c, 0xDD));
    _mm512_storeu_ps(dst + (4 + j) * ldd, _mm512_shuffle_f32x4(b, d, 0x88));
    _mm512_storeu_ps(dst + (12 + j) * ldd, _mm512_shuffle_f32x4(b, d, 0xDD));
  }
}

// ---------------------------------------------------------------------------------------
// f32, W [N, K]: MR x rows times NR W rows, accumulated along K, reduced at the end.

template <int MR, int NR>
__attribute__((always_inline)) inline void UkrF32NK(const float* x, int64_t ldx,
                                                    const float* w, int64_t ldw, float* y,
                                                    int64_t ldy, int64_t K) {
  __m512 acc[MR][NR];
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 a[MR];
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = _mm512_loadu_ps(x + r * ldx + k);
    #pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) {
      __m512 b = _mm512_loadu_ps(w + c * ldw + k);
      __asm__("" : "+v"(b));  // one load per W vector, not one per FMA operand
      #pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_fmadd_ps(a[r], b, acc[r][c]);
    }
  }
  if (k < K) {
    const __mmask16 mk = Mask16(K - k);
    __m512 a[MR];
    #pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = _mm512_maskz_loadu_ps(mk, x + r * ldx + k);
    #pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) {
      __m512 b = _mm512_maskz_loadu_ps(mk, w + c * ldw + k);
      #pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_fmadd_ps(a[r], b, acc[r][c]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
}

constexpr int kMrNK = 4;  // x rows per nk microkernel
constexpr int kNrNK = 6;  // W rows per nk microkernel

template <int MR>
inline void DispatchF32NK(const float* x, const float* w, float* y, int64_t K, int64_t N,
                          int64_t nrows) {
  switch (nrows) {
    case 1: return UkrF32NK<MR, 1>(x, K, w, K, y, N, K);
    case 2: return UkrF32NK<MR, 2>(x, K, w, K, y, N, K);
    case 3: return UkrF32NK<MR, 3>(x, K, w, K, y, N, K);
    case 4: return UkrF32NK<MR, 4>(x, K, w, K, y, N, K);
    case 5: return UkrF32NK<MR, 5>(x, K, w, K, y, N, K);
    default: return UkrF32NK<MR, 6>(x, K, w, K, y, N, K);
  }
}

inline void BlockF32NK(const float* x, const float* w, float* y, int64_t K, int64_t N,
                       int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kNrNK) {  // a group of W rows stays in L1 over all x rows
    int64_t nr = std::min<int64_t>(kNrNK, n1 - n);
    const float* wn = w + n * K;
    int64_t m = m0;
    for (; m + kMrNK <= m1; m += kMrNK)
      DispatchF32NK<kMrNK>(x + m * K, wn, y + m * N + n, K, N, nr);
    switch (m1 - m) {
      case 1: DispatchF32NK<1>(x + m * K, wn, y + m * N + n, K, N, nr); break;
      case 2: DispatchF32NK<2>(x + m * K, wn, y + m * N + n, K, N, nr); break;
      case 3: DispatchF32NK<3>(x + m * K, wn, y + m * N + n, K, N, nr); break;
      default: break;
    }
  }
}

#endif  // JAXSERVE_AVX512

}  // namespace
}  // namespace matmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_AVX512_H_
