// y[M, N] = x[M, K] @ W as XLA CPU FFI handlers, float32 accumulation, on the FFI pool.
//
// Handlers (registered as "jaxserve_<symbol>"):
//   matmul_f32_kn          x f32 [M, K], W f32 [K, N] -> y f32 [M, N]
//   matmul_f32_nk          x f32 [M, K], W f32 [N, K] -> y f32 [M, N]   (y = x @ W^T)
//   matmul_bf16_kn         x bf16 [M, K], W bf16 [K, N] -> y bf16 [M, N]
//   matmul_bf16_nk         x bf16 [M, K], W bf16 [N, K] -> y bf16 [M, N]
//   matmul_bf16_kn_outf32  x bf16 [M, K], W bf16 [K, N] -> y f32 [M, N]  (the f32 sums)
//   matmul_bf16_nk_outf32  x bf16 [M, K], W bf16 [N, K] -> y f32 [M, N]
//   gated_mlp_f32          x f32 [M, K], Wg f32 [K, N], Wu f32 [K, N] -> y f32 [M, N]
//   gated_mlp_bf16         x bf16 [M, K], Wg bf16 [K, N], Wu bf16 [K, N] -> y bf16 [M, N]
//   lm_head_argmax_f32     h f32 [M, K], E f32 [N, K] -> idx s32 [M]  (argmax of h @ E^T)
//   lm_head_argmax_bf16    h bf16 [M, K], E bf16 [N, K] -> idx s32 [M]
//   lm_head_argmax_kn_f32  h f32 [M, K], Et f32 [K, N] -> idx s32 [M]  (argmax of h @ Et)
//   lm_head_argmax_kn_bf16 h bf16 [M, K], Et bf16 [K, N] -> idx s32 [M]
// Every handler takes one more operand after the listed ones, rows s32 [1]: only the first
// min(max(rows[0], 0), M) rows of x are computed (the step's real tokens; the rest is
// bucket padding); the rows of y (idx) past them are zeros.
// bf16 products are exact in f32 and summed in f32; y is rounded to nearest even once.
// gated_mlp: y = silu(x @ Wg) * (x @ Wu), silu(g) = g / (1 + exp(-g)), the epilogue in f32
// on the accumulators: items of 32 output columns whose microkernel keeps both products'
// accumulators (6 rows x (32 + 32) columns); bf16 packs both 32-column slices into one
// 64-column panel where packing pays (see PackKN).
// Weights streamed from memory (every call with other weights, as in the engine): unpacked
// kn items (and gated ones) prefetch their W ahead of the first row block and the next
// item's panel while they compute (see Prefetch); packing prefetches ahead.
//
// With AVX-512 the "kn" kernels are register-blocked microkernels of up to 6 rows x 64
// columns (24 zmm accumulators, W streamed row by row, x broadcast); bf16 uses vdpbf16ps
// on K-pairs, interleaving two W rows in registers (unpacklo/hi_epi16) and undoing the
// resulting column permutation once at the store; f32 takes K in blocks of 512. Where it
// pays (bf16: M >= 256, or K >= 1024 and M >= 32; f32: M >= 256 and K >= 1024) each
// 64-column panel of W is first packed contiguously (bf16: K-pairs pre-interleaved).
// "nk" (W [N, K]) with M >= 16 (bf16) / 64 (f32) transposes each 64-row panel of W into
// that packed kn layout (16x16 in-register transposes) and reuses the kn microkernels;
// below that, where reading W bounds the product, it accumulates 4 x rows x 6 W rows
// along K and reduces horizontally. Tails in M, N and K (odd K for bf16 included) use
// smaller instantiations and masked loads. Work is split into (column panel x row chunk)
// items claimed from an atomic counter by the calling thread and num_threads - 1 pool
// tasks, so a busy pool can never deadlock the call. Without AVX-512 (or AVX512_BF16 for
// bf16) a portable scalar loop nest is used.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "common.h"
#include "matmul_avx2.h"

namespace ffi = xla::ffi;
using jaxserve_cpu::Bf16ToF32;
using jaxserve_cpu::F32ToBf16;
using jaxserve_cpu::FromF32;
using jaxserve_cpu::ParallelFor;
using jaxserve_cpu::ParallelForAhead;
using jaxserve_cpu::ToF32;
#ifdef JAXSERVE_AVX2
namespace avx2 = jaxserve_cpu::avx2;
#endif
#ifdef __AVX512F__
using jaxserve_cpu::Exp512;
#endif

namespace {

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kMrKN = 6;  // rows per kn microkernel (AVX-512: x 64 columns, 24 accumulators)

// What a kn microkernel prefetches besides its own operands (weights streamed from DRAM,
// as in the engine, where every call has other weights, beyond the L3):
//  * ahead: its W `ahead` rows ahead of the current one (the item's first row block, which
//    reads the panel from memory; the later row blocks find it in L2);
//  * the next item's W panel: K-step s prefetches its row `row0 + s`, while s < rows; two
//    lines at next0 and two at next1 (f32), one at each (bf16): 64 columns, or 32 of the
//    gate's and of up's. The item computes while that panel streams in.
struct Prefetch {
  const char* next0 = nullptr;
  const char* next1 = nullptr;
  int64_t ld = 0;     // bytes between the next panel's rows
  int64_t rows = 0;   // rows of the next panel to prefetch (0: none)
  int64_t ahead = 0;  // rows ahead in the current W (0: none)
};

// Rows ahead that an item's first row block prefetches of its W (see Prefetch), and that
// packing a panel prefetches; kPrefetchNext: unpacked kn items prefetch the next item's
// panel. Measured on Zen 5 with weights beyond the L3 (as in the engine) at M = 64: bf16
// +25-40%, f32 +15-25% (ahead alone: +10-25%); with cached weights they cost ~2%.
constexpr int64_t kPrefetchF32 = 32;
constexpr int64_t kPrefetchBf16 = 32;
constexpr int64_t kPrefetchPack = 32;
constexpr bool kPrefetchNext = true;

// The next panel's rows, `per_pass` per K-step pass, spread over the passes of an item:
// pass `pass` prefetches rows [pass * per_pass, ...) of K.
inline Prefetch PassPrefetch(const Prefetch& item, int64_t pass, int64_t per_pass,
                             int64_t K, int64_t ahead) {
  Prefetch p;
  p.ahead = ahead;
  int64_t r0 = pass * per_pass;
  if (item.next0 == nullptr || r0 >= K) return p;
  p.next0 = item.next0 + r0 * item.ld;
  p.next1 = item.next1 + r0 * item.ld;
  p.ld = item.ld;
  p.rows = std::min(per_pass, K - r0);
  return p;
}

// Splits M into row chunks (multiples of `mr`) so that panels x chunks gives the threads
// enough items to balance, while a chunk's x rows stay cache-sized.
int64_t RowChunk(int64_t m, int64_t panels, int64_t mr, int64_t max_rows) {
  int64_t want_chunks = std::max<int64_t>(1, CeilDiv(8, panels));
  int64_t rows = CeilDiv(m, want_chunks);
  rows = CeilDiv(rows, mr) * mr;
  return std::max<int64_t>(mr, std::min<int64_t>(rows, max_rows / mr * mr));
}

// Portable fallback for rows [m0, m1) x columns [n0, n1); ldy > 0: y is a buffer of
// those columns only, row m at y + m * ldy.
template <typename T, typename YT, bool kNK>
void ScalarBlock(const T* x, const T* w, YT* y, int64_t K, int64_t N, int64_t m0,
                 int64_t m1, int64_t n0, int64_t n1, int64_t ldy = 0) {
  std::vector<float> acc(n1 - n0);
  for (int64_t m = m0; m < m1; ++m) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const T* xr = x + m * K;
    if (kNK) {
      for (int64_t n = n0; n < n1; ++n) {
        const T* wr = w + n * K;
        float s = 0.0f;
        for (int64_t k = 0; k < K; ++k) s += ToF32(xr[k]) * ToF32(wr[k]);
        acc[n - n0] = s;
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        float a = ToF32(xr[k]);
        const T* wr = w + k * N;
        for (int64_t n = n0; n < n1; ++n) acc[n - n0] += a * ToF32(wr[n]);
      }
    }
    YT* yr = ldy > 0 ? y + m * ldy - n0 : y + m * N;
    for (int64_t n = n0; n < n1; ++n) yr[n] = FromF32<YT>(acc[n - n0]);
  }
}

inline float SiluMulScalar(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }

// Portable fallback of the gated product: y = silu(x @ wg) * (x @ wu), W [K, N].
template <typename T>
void ScalarGated(const T* x, const T* wg, const T* wu, T* y, int64_t K, int64_t N,
                 int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  std::vector<float> g(n1 - n0), u(n1 - n0);
  for (int64_t m = m0; m < m1; ++m) {
    std::fill(g.begin(), g.end(), 0.0f);
    std::fill(u.begin(), u.end(), 0.0f);
    const T* xr = x + m * K;
    for (int64_t k = 0; k < K; ++k) {
      float a = ToF32(xr[k]);
      for (int64_t n = n0; n < n1; ++n) {
        g[n - n0] += a * ToF32(wg[k * N + n]);
        u[n - n0] += a * ToF32(wu[k * N + n]);
      }
    }
    for (int64_t n = n0; n < n1; ++n) y[m * N + n] = FromF32<T>(SiluMulScalar(g[n - n0], u[n - n0]));
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define JAXSERVE_AVX512 1
#endif

#ifdef JAXSERVE_AVX512

// The microkernels keep their accumulators in arrays indexed by constant-bound loops; the
// `#pragma GCC unroll` on every such loop lets GCC keep them in zmm registers (without it
// g++ 12 stores all of them to the stack on every K step: 4x slower).

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
#define JAXSERVE_HAVE_TRANSPOSE 1

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

#if defined(JAXSERVE_AVX512) && defined(__AVX512BF16__)
#define JAXSERVE_AVX512BF16 1

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

#endif  // JAXSERVE_AVX512 && __AVX512BF16__

// ---------------------------------------------------------------------------------------
// Drivers: (column panel x row chunk) work items. T is the operands' type (float or
// uint16_t = bf16), YT the result's (T, or float for bf16 operands).

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

// x rows per work item: an AVX2 item packs its panel of W, which more rows amortize (M =
// 512 in one item instead of six: +5-10% on Zen 3).
template <typename T>
constexpr int64_t kMaxRowsFor = kAvx2Path<T> ? 384 : kMaxRows;

// Packs `rows` (<= 64) rows of W [N, K], each `row_bytes` long, into a panel
// P[unit][64] of 32-bit units: unit c of a row is its bytes [4c, 4c + 4) -- one float
// (f32, `units` = K) or one K-pair of bf16 (`units` = K / 2). Rows past `rows` are zero.
[[maybe_unused]] void PackPanel32(const char* src, int64_t row_bytes, int64_t rows,
                                  int64_t units, uint32_t* dst) {
  int64_t c = 0;
#ifdef JAXSERVE_HAVE_TRANSPOSE
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

// The nk product for M >= kPackRowsNK*: each item transposes a 64-row panel of W into the
// kn layout once (a thread-local buffer) and runs the kn microkernels on it, so no
// horizontal reductions are needed. Below, the product is bound by reading W and the
// dot-product kernels do as well (f32) or better.
constexpr int64_t kPackRowsNKBf16 = 16;
constexpr int64_t kPackRowsNKF32 = 64;

template <typename T, typename YT>
void RunNKPacked(ffi::ThreadPool& pool, const T* x, const T* w, YT* y, int64_t M, int64_t K,
                 int64_t N) {
  constexpr bool kBf16 = sizeof(T) == 2;
  const int64_t units = kBf16 ? CeilDiv(K, 2) : K;  // 32-bit units per packed W row
  int64_t panels = CeilDiv(N, 64);
  // x rows per item: ~256 KiB of x (so x and the panel stay in L2: +15% at M = 512 over
  // all of M) but at least 128 rows, so a panel is not re-packed too often.
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

// The kn product with each item's 64-column panel of W packed first (contiguous, and for
// bf16 K-pair interleaved once instead of once per row block). Measured on Zen 5: it pays
// for bf16 at M >= 256 or long K (+25% at K = 1536, M >= 64) and for f32 only at both;
// at M <= 64, K = 512 it costs 5-15%.
template <typename T>
bool PackKN(int64_t M, int64_t K) {
  if (sizeof(T) == 2) return M >= 256 || (K >= 1024 && M >= 32);
  return M >= 256 && K >= 1024;
}

template <typename T, typename YT>
void RunKNPacked(ffi::ThreadPool& pool, const T* x, const T* w, YT* y, int64_t M, int64_t K,
                 int64_t N) {
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

template <typename T, typename YT>
void RunKN(ffi::ThreadPool& pool, const T* x, const T* w, YT* y, int64_t M, int64_t K,
           int64_t N) {
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

template <typename T, typename YT>
void RunNK(ffi::ThreadPool& pool, const T* x, const T* w, YT* y, int64_t M, int64_t K,
           int64_t N) {
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

// y = silu(x @ wg) * (x @ wu), W [K, N] both: items of 32 output columns (both W's
// columns in one microkernel) x row chunks. bf16 packs the two 32-column slices into one
// 64-column panel where PackKN says packing pays.
constexpr int64_t kPanelGated = 32;

template <typename T>
void RunGated(ffi::ThreadPool& pool, const T* x, const T* wg, const T* wu, T* y, int64_t M,
              int64_t K, int64_t N) {
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

// ---------------------------------------------------------------------------------------
// lm_head_argmax: idx[m] = argmax_n (x @ W^T)[m, n] for W [N, K] (a tied LM head), with
// jnp.argmax's rule (the first NaN if a row has one, else the first of the largest), the
// logits never written: work items are (block of up to kArgmaxBlock W rows x row chunk);
// an item computes its block one 64-row panel at a time into a small thread-local buffer
// [rows][64] with the nk product's kernels (packed: the panel transposed, then the kn
// microkernels; below the packing threshold, the dot-product kernels), folds each row of it
// into the item's running (max, index), and writes those to its own slot; the slots are
// merged in column order at the end (a later block wins only with a strictly larger value
// or a first NaN). While a panel computes, the next one (the next item's first panel after
// the last) is prefetched, a slice after each row block.
// kKN (lm_head_argmax_kn_*: W [K, N], the transposed embedding): each 64-column panel is
// computed as the kn product does for the same M: the unpacked kn microkernels on W in
// place (no transpose), prefetching W ahead in the first row block and the next panel (the
// next item's first after the last) over the passes; where PackKN says packing pays, the
// panel is packed first (PackPanelKN, prefetching ahead) and the packed kernels run on it.

constexpr int64_t kArgmaxPanel = 64;    // W rows per panel (buffer columns)
constexpr int64_t kArgmaxBlock = 512;   // W rows per work item, at most
constexpr int64_t kArgmaxRows = 264;    // x rows per work item, at most (M <= 264: all)
constexpr int64_t kArgmaxStepRows = 12; // rows computed between two prefetch slices

// Folds columns [0, ncols) of a buffer row (column c is logit n0 + c) into (best, idx).
inline void FoldArgmaxRow(const float* row, int64_t ncols, int64_t n0, float& best,
                          int32_t& idx) {
  if (best != best) return;  // a NaN came first: it stays
#ifdef JAXSERVE_AVX512
  const __m512 b = _mm512_set1_ps(best);
  __mmask16 hit = 0;
  for (int64_t c = 0; c < ncols; c += 16) {
    const __mmask16 mk = Mask16(ncols - c);
    // v > best, or unordered (v is NaN): the rare case, resolved below in order
    hit |= _mm512_mask_cmp_ps_mask(mk, _mm512_maskz_loadu_ps(mk, row + c), b, _CMP_NLE_UQ);
  }
  if (!hit) return;
#elif defined(JAXSERVE_AVX2)
  if (!avx2::AnyAbove(row, ncols, best)) return;
#endif
  for (int64_t c = 0; c < ncols; ++c) {
    const float v = row[c];
    if (v != v) {
      best = v;
      idx = static_cast<int32_t>(n0 + c);
      return;
    }
    if (v > best) {
      best = v;
      idx = static_cast<int32_t>(n0 + c);
    }
  }
}

// Prefetches lines [l0, l1) of `rows` W rows of `row_bytes` each from `src` (line l: row
// l / lines_per_row).
inline void PrefetchRowLines(const char* src, int64_t row_bytes, int64_t l0, int64_t l1) {
  const int64_t per_row = CeilDiv(row_bytes, 64);
  for (int64_t l = l0; l < l1; ++l)
    jaxserve_cpu::PrefetchL1(src + (l / per_row) * row_bytes + (l % per_row) * 64);
}

template <typename T, bool kKN = false>
void RunLmHeadArgmax(ffi::ThreadPool& pool, const T* x, const T* w, int32_t* out, int64_t M,
                     int64_t K, int64_t N) {
  if (K == 0) {  // every logit is 0: the first
    std::fill(out, out + M, 0);
    return;
  }
  constexpr bool kBf16 = sizeof(T) == 2;
  const bool packed = kHavePacked<T> && (kKN ? PackKN<T>(M, K)
                                             : M >= (kBf16 ? kPackRowsNKBf16 : kPackRowsNKF32));
  const int64_t units = kBf16 ? CeilDiv(K, 2) : K;  // 32-bit units per packed W row
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(T));
  const int64_t rows = M <= kArgmaxRows ? M : kArgmaxRows / kMrKN * kMrKN;
  const int64_t chunks = CeilDiv(M, rows);
  // Blocks of whole panels, at most kArgmaxBlock rows, but enough items for the threads.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t block = CeilDiv(CeilDiv(N, std::max<int64_t>(1, threads * 4 / chunks)),
                          kArgmaxPanel) * kArgmaxPanel;
  block = std::max<int64_t>(kArgmaxPanel, std::min<int64_t>(kArgmaxBlock, block));
  const int64_t blocks = CeilDiv(N, block);
  std::vector<float> vals(blocks * M);
  std::vector<int32_t> idxs(blocks * M);
  ParallelForAhead(pool, blocks * chunks, [&](int64_t item, int64_t next) {
    const int64_t b = item / chunks, c = item % chunks;
    const int64_t m0 = c * rows, mr = std::min(M, m0 + rows) - m0;
    const int64_t nb0 = b * block, nb1 = std::min(N, nb0 + block);
    const T* xs = x + m0 * K;
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < mr * kArgmaxPanel) buf.resize(mr * kArgmaxPanel);
    float* best = vals.data() + b * M + m0;
    int32_t* idx = idxs.data() + b * M + m0;
    std::fill(best, best + mr, -std::numeric_limits<float>::infinity());
    std::fill(idx, idx + mr, static_cast<int32_t>(nb0));
    for (int64_t n0 = nb0; n0 < nb1; n0 += kArgmaxPanel) {
      const int64_t ncols = std::min<int64_t>(kArgmaxPanel, nb1 - n0);
      if constexpr (kKN) {
        if (packed) {
          thread_local std::vector<T> kn_panel;
          const int64_t elems = (kBf16 ? CeilDiv(K, 2) * 2 : K) * 64;
          if (static_cast<int64_t>(kn_panel.size()) < elems) kn_panel.resize(elems);
          PackPanelKN(w, K, N, n0, ncols, kn_panel.data());  // prefetches ahead as it goes
          BlockKNPacked<T, float>(xs, kn_panel.data(), buf.data(), K, N, 0, mr, n0, ncols,
                                  Prefetch(), kArgmaxPanel);
        } else {
          // The next panel of this block, else the next item's first (unless it is this
          // same block again, another row chunk's).
          int64_t pf_n0 = n0 + kArgmaxPanel < nb1 ? n0 + kArgmaxPanel : -1;
          if (pf_n0 < 0 && next >= 0 && next / chunks != b) pf_n0 = next / chunks * block;
          BlockKN<T, float>(xs, w, buf.data(), K, N, 0, mr, n0, ncols,
                            NextPanel(w, w + 32, N, n0, pf_n0), kArgmaxPanel);
        }
        for (int64_t m = 0; m < mr; ++m)
          FoldArgmaxRow(buf.data() + m * kArgmaxPanel, ncols, n0, best[m], idx[m]);
        continue;
      }
      const char* src = reinterpret_cast<const char*>(w + n0 * K);
      // What to prefetch meanwhile: the next panel of this block, else the next item's
      // first (unless it is this same panel again, another row chunk's).
      int64_t pf_n0 = n0 + kArgmaxPanel < nb1 ? n0 + kArgmaxPanel : -1;
      if (pf_n0 < 0 && next >= 0 && next / chunks != b) pf_n0 = next / chunks * block;
      const char* pf_src = pf_n0 >= 0 ? reinterpret_cast<const char*>(w + pf_n0 * K) : nullptr;
      const int64_t pf_lines =
          pf_n0 >= 0 ? std::min<int64_t>(kArgmaxPanel, N - pf_n0) * CeilDiv(row_bytes, 64) : 0;
      if (packed) {
        thread_local std::vector<uint32_t> panel;
        if (static_cast<int64_t>(panel.size()) < units * 64) panel.resize(units * 64);
        PackPanel32(src, row_bytes, ncols, kBf16 ? K / 2 : K, panel.data());
        if (kBf16 && K % 2) {  // the last, single K: (W[n, K-1], 0)
          for (int64_t r = 0; r < 64; ++r) {
            uint16_t v = 0;
            if (r < ncols) std::memcpy(&v, src + (r * K + K - 1) * sizeof(T), 2);
            panel[(K / 2) * 64 + r] = v;
          }
        }
        const int64_t steps = CeilDiv(mr, kArgmaxStepRows);
        for (int64_t s = 0; s < steps; ++s) {
          const int64_t r0 = s * kArgmaxStepRows, r1 = std::min(mr, r0 + kArgmaxStepRows);
          if (pf_src)
            PrefetchRowLines(pf_src, row_bytes, pf_lines * s / steps,
                             pf_lines * (s + 1) / steps);
          BlockKNPacked<T, float>(xs, reinterpret_cast<const T*>(panel.data()), buf.data(), K,
                                  kArgmaxPanel, r0, r1, 0, ncols);
        }
      } else {
        if (pf_src) PrefetchRowLines(pf_src, row_bytes, 0, pf_lines);
        BlockNK<T, float>(xs, reinterpret_cast<const T*>(src), buf.data(), K, kArgmaxPanel,
                          0, mr, 0, ncols);
      }
      for (int64_t m = 0; m < mr; ++m)
        FoldArgmaxRow(buf.data() + m * kArgmaxPanel, ncols, n0, best[m], idx[m]);
    }
  });
  for (int64_t m = 0; m < M; ++m) {  // merge the blocks in column order
    float bv = vals[m];
    int32_t bi = idxs[m];
    for (int64_t b = 1; b < blocks && bv == bv; ++b) {
      const float v = vals[b * M + m];
      if (v != v || v > bv) {
        bv = v;
        bi = idxs[b * M + m];
      }
    }
    out[m] = bi;
  }
}

template <ffi::DataType DT>
using Elem = std::conditional_t<DT == ffi::DataType::F32, float, uint16_t>;
using RowsBuffer = ffi::Buffer<ffi::DataType::S32, 1>;

// How many leading rows of an [M, ...] operand to compute: rows[0] clamped to [0, M].
int64_t ValidRows(const RowsBuffer& rows, int64_t M) {
  if (rows.element_count() < 1) return M;
  return std::clamp<int64_t>(rows.typed_data()[0], 0, M);
}

// Zeroes rows [m0, M) of a row-major [M, N] result.
template <typename YT>
void ZeroRows(YT* y, int64_t m0, int64_t M, int64_t N) {
  if (m0 < M) std::memset(y + m0 * N, 0, sizeof(YT) * (M - m0) * N);
}

template <ffi::DataType DT, bool kNK, ffi::DataType YDT = DT>
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<DT, 2> x, ffi::Buffer<DT, 2> w,
                      RowsBuffer rows, ffi::ResultBuffer<YDT, 2> y) {
  using T = Elem<DT>;
  using YT = Elem<YDT>;
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  int64_t M = xd[0], K = xd[1];
  int64_t N = kNK ? wd[0] : wd[1];
  int64_t wk = kNK ? wd[1] : wd[0];
  if (wk != K || yd[0] != M || yd[1] != N)
    return ffi::Error::InvalidArgument("matmul: inconsistent shapes of x, w and y");
  if (M == 0 || N == 0) return ffi::Error::Success();
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  const T* wp = reinterpret_cast<const T*>(w.untyped_data());
  YT* yp = reinterpret_cast<YT*>(y->untyped_data());
  const int64_t valid = ValidRows(rows, M);
  ZeroRows(yp, valid, M, N);
  M = valid;
  if (M == 0) return ffi::Error::Success();
  if (kNK) {
    RunNK<T, YT>(pool, xp, wp, yp, M, K, N);
  } else {
    RunKN<T, YT>(pool, xp, wp, yp, M, K, N);
  }
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error GatedImpl(ffi::ThreadPool pool, ffi::Buffer<DT, 2> x, ffi::Buffer<DT, 2> wg,
                     ffi::Buffer<DT, 2> wu, RowsBuffer rows, ffi::ResultBuffer<DT, 2> y) {
  using T = Elem<DT>;
  auto xd = x.dimensions(), gd = wg.dimensions(), ud = wu.dimensions(), yd = y->dimensions();
  int64_t M = xd[0], K = xd[1], N = gd[1];
  if (gd[0] != K || ud[0] != K || ud[1] != N || yd[0] != M || yd[1] != N)
    return ffi::Error::InvalidArgument("gated_mlp: inconsistent shapes of x, w_gate, w_up, y");
  if (M == 0 || N == 0) return ffi::Error::Success();
  T* yp = reinterpret_cast<T*>(y->untyped_data());
  const int64_t valid = ValidRows(rows, M);
  ZeroRows(yp, valid, M, N);
  if (valid == 0) return ffi::Error::Success();
  RunGated<T>(pool, reinterpret_cast<const T*>(x.untyped_data()),
              reinterpret_cast<const T*>(wg.untyped_data()),
              reinterpret_cast<const T*>(wu.untyped_data()), yp, valid, K, N);
  return ffi::Error::Success();
}

template <ffi::DataType DT, bool kKN = false>
ffi::Error LmHeadArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<DT, 2> h, ffi::Buffer<DT, 2> e,
                            RowsBuffer rows, ffi::ResultBuffer<ffi::DataType::S32, 1> idx) {
  using T = Elem<DT>;
  auto hd = h.dimensions(), ed = e.dimensions(), id = idx->dimensions();
  int64_t M = hd[0], K = hd[1], N = kKN ? ed[1] : ed[0];
  if ((kKN ? ed[0] : ed[1]) != K || id[0] != M)
    return ffi::Error::InvalidArgument("lm_head_argmax: inconsistent shapes of h, e and idx");
  if (N == 0 || N > std::numeric_limits<int32_t>::max())
    return ffi::Error::InvalidArgument("lm_head_argmax: the vocabulary must be 1 to 2^31 - 1");
  if (M == 0) return ffi::Error::Success();
  int32_t* out = reinterpret_cast<int32_t*>(idx->untyped_data());
  const int64_t valid = ValidRows(rows, M);
  ZeroRows(out, valid, M, 1);
  if (valid == 0) return ffi::Error::Success();
  RunLmHeadArgmax<T, kKN>(pool, reinterpret_cast<const T*>(h.untyped_data()),
                          reinterpret_cast<const T*>(e.untyped_data()), out, valid, K, N);
  return ffi::Error::Success();
}

}  // namespace

using F32Buffer = ffi::Buffer<ffi::DataType::F32, 2>;
using Bf16Buffer = ffi::Buffer<ffi::DataType::BF16, 2>;
using S32Vector = ffi::Buffer<ffi::DataType::S32, 1>;
constexpr auto kF32KN = MatmulImpl<ffi::DataType::F32, false>;
constexpr auto kF32NK = MatmulImpl<ffi::DataType::F32, true>;
constexpr auto kBf16KN = MatmulImpl<ffi::DataType::BF16, false>;
constexpr auto kBf16NK = MatmulImpl<ffi::DataType::BF16, true>;
constexpr auto kBf16KNOutF32 = MatmulImpl<ffi::DataType::BF16, false, ffi::DataType::F32>;
constexpr auto kBf16NKOutF32 = MatmulImpl<ffi::DataType::BF16, true, ffi::DataType::F32>;
constexpr auto kGatedF32 = GatedImpl<ffi::DataType::F32>;
constexpr auto kGatedBf16 = GatedImpl<ffi::DataType::BF16>;
constexpr auto kArgmaxF32 = LmHeadArgmaxImpl<ffi::DataType::F32>;
constexpr auto kArgmaxBf16 = LmHeadArgmaxImpl<ffi::DataType::BF16>;
constexpr auto kArgmaxKNF32 = LmHeadArgmaxImpl<ffi::DataType::F32, true>;
constexpr auto kArgmaxKNBf16 = LmHeadArgmaxImpl<ffi::DataType::BF16, true>;

#define JAXSERVE_MATMUL_HANDLER(symbol, impl, buffer, out_buffer)              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                 \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<buffer>()                            \
                                    .Arg<buffer>()                            \
                                    .Arg<RowsBuffer>()                        \
                                    .Ret<out_buffer>());
#define JAXSERVE_GATED_HANDLER(symbol, impl, buffer)                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                 \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<buffer>()                            \
                                    .Arg<buffer>()                            \
                                    .Arg<buffer>()                            \
                                    .Arg<RowsBuffer>()                        \
                                    .Ret<buffer>());
#define JAXSERVE_ARGMAX_HANDLER(symbol, impl, buffer)                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                 \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<buffer>()                            \
                                    .Arg<buffer>()                            \
                                    .Arg<RowsBuffer>()                        \
                                    .Ret<S32Vector>());

#pragma GCC visibility push(default)
JAXSERVE_MATMUL_HANDLER(matmul_f32_kn, kF32KN, F32Buffer, F32Buffer)
JAXSERVE_MATMUL_HANDLER(matmul_f32_nk, kF32NK, F32Buffer, F32Buffer)
JAXSERVE_MATMUL_HANDLER(matmul_bf16_kn, kBf16KN, Bf16Buffer, Bf16Buffer)
JAXSERVE_MATMUL_HANDLER(matmul_bf16_nk, kBf16NK, Bf16Buffer, Bf16Buffer)
JAXSERVE_MATMUL_HANDLER(matmul_bf16_kn_outf32, kBf16KNOutF32, Bf16Buffer, F32Buffer)
JAXSERVE_MATMUL_HANDLER(matmul_bf16_nk_outf32, kBf16NKOutF32, Bf16Buffer, F32Buffer)
JAXSERVE_GATED_HANDLER(gated_mlp_f32, kGatedF32, F32Buffer)
JAXSERVE_GATED_HANDLER(gated_mlp_bf16, kGatedBf16, Bf16Buffer)
JAXSERVE_ARGMAX_HANDLER(lm_head_argmax_f32, kArgmaxF32, F32Buffer)
JAXSERVE_ARGMAX_HANDLER(lm_head_argmax_bf16, kArgmaxBf16, Bf16Buffer)
JAXSERVE_ARGMAX_HANDLER(lm_head_argmax_kn_f32, kArgmaxKNF32, F32Buffer)
JAXSERVE_ARGMAX_HANDLER(lm_head_argmax_kn_bf16, kArgmaxKNBf16, Bf16Buffer)
#pragma GCC visibility pop
