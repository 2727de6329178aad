// The AVX2 + FMA path of matmul.cc: 8-wide float32 microkernels, bfloat16 widened to float32
// on load (vdpbf16ps needs AVX512_BF16). Used where AVX-512 is missing (and, for bfloat16,
// where AVX512_BF16 is): x86-64-v3 CPUs such as Zen 1-3 and Haswell to Alder Lake.
//
// One work item is rows x a panel of W (64 output columns; gated: 32 columns of the gate
// and the same 32 of up). K is taken in blocks of kKc. Per K block the panel is either read
// in place (few rows: W is streamed once, straight from memory) or first packed into a
// float32 [kKc][64] buffer (more rows than one row block: the panel is then read once from
// memory, widened once, and reused by every row block from L2). bfloat16 x rows are widened
// per row block and K block; a microkernel broadcasts x values from its MR rows. A
// microkernel keeps MR rows x NV 8-column vectors of accumulators (MR * NV <= 12 of the 16
// ymm registers) and adds a K block into a float32 tile; partial sums of an item live in
// a [rows][64] buffer between K blocks, and the last block's epilogue writes y (float32 or
// bfloat16, or silu(gate) * up). "nk" W ([N, K]) with few rows takes dot products along K
// (no transpose); with more it packs the panel transposed and runs the kn microkernels.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_AVX2_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_AVX2_H_

#if defined(__AVX2__) && defined(__FMA__)
#define JAXSERVE_AVX2 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace jaxserve_cpu {
namespace avx2 {

constexpr int64_t kKc = 256;       // K block: a 16-column strip of it is 16 KiB (L1)
constexpr int kRowBlock = 6;       // rows of x per microkernel, at most
constexpr int64_t kPanelCols = 64; // panel columns (plain: 64 of W; gated: 32 + 32)
constexpr int64_t kAhead = 24;     // rows of W prefetched ahead when streaming it in place
constexpr int64_t kNkDotRows = 6;  // "nk" with at most this many rows: dot products
constexpr int64_t kPackRows = 6;   // "kn" with more rows than this: pack the panel

inline __m256i MaskN(int64_t n) {  // the first n (<= 8) 32-bit lanes
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::max<int64_t>(n, 0))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 values as float32: float as they are, bfloat16 shifted into the high half.
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// The first n (<= 8) of 8 values, zeros after; nothing past p[n - 1] is read.
inline __m256 Load8Tail(const float* p, int64_t n) { return _mm256_maskload_ps(p, MaskN(n)); }
inline __m256 Load8Tail(const uint16_t* p, int64_t n) {
  uint16_t buf[8] = {};
  if (n > 0) std::memcpy(buf, p, std::min<int64_t>(n, 8) * sizeof(uint16_t));
  return Load8(buf);
}

// float32 -> bfloat16, round to nearest even, NaN stays NaN (as F32ToBf16).
inline __m128i ToBf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// The first n (<= 8) lanes of v to dst.
inline void Store8(float* dst, __m256 v, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(dst, v);
  } else if (n > 0) {
    _mm256_maskstore_ps(dst, MaskN(n), v);
  }
}
inline void Store8(uint16_t* dst, __m256 v, int64_t n) {
  const __m128i h = ToBf16(v);
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
  } else if (n > 0) {
    uint16_t buf[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buf), h);
    std::memcpy(dst, buf, n * sizeof(uint16_t));
  }
}

// silu(g) * u = g / (1 + exp(-g)) * u, in float32.
inline __m256 SiluMul(__m256 g, __m256 u) {
  const __m256 e = Exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8-column vectors per row of a microkernel of MR rows: MR * NV accumulators.
template <int MR>
constexpr int kNv = MR == 1 ? 8 : (MR <= 3 ? 4 : 2);

// A microkernel's vectors are two runs of NV/2: vector v reads columns from `lo` (v < NV/2)
// or `hi`, 8 * (v % (NV/2)) further. Plain products: lo and hi are adjacent halves of a
// strip; gated: the same columns of the gate (lo) and of up (hi).
template <int NV, typename P>
inline P* VecAt(P* lo, P* hi, int v) {
  return (v < NV / 2 ? lo : hi) + 8 * (v % (NV / 2));
}

// tile[r][8v + i] (+)= sum_{k < K} x[r][k] * W_v[k][i]: MR rows of x (ldx apart), NV
// vectors of W columns at VecAt(lo, hi, v) + k * ld. kTail: vector v has only valid[v]
// (0..8) readable columns. `ahead` > 0: W is streamed from memory; its lines `ahead` rows
// on are prefetched.
template <int MR, int NV, typename WT, bool kTail>
__attribute__((always_inline)) inline void Ukr(const float* x, int64_t ldx, const WT* lo,
                                               const WT* hi, int64_t ld, int64_t K,
                                               const int64_t* valid, bool accumulate,
                                               int64_t ahead, float* tile) {
  constexpr int kPerLine = 64 / (8 * sizeof(WT));  // vectors of a run per cache line
  __m256 acc[MR][NV];
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? _mm256_loadu_ps(tile + (r * NV + v) * 8) : _mm256_setzero_ps();
  #pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    if (ahead > 0) {
      #pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        if ((v % (NV / 2)) % kPerLine == 0)
          PrefetchL1(VecAt<NV>(lo, hi, v) + (k + ahead) * ld);
    }
    __m256 b[NV];
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const WT* p = VecAt<NV>(lo, hi, v) + k * ld;
      b[v] = kTail ? Load8Tail(p, valid[v]) : Load8(p);
    }
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
      #pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(tile + (r * NV + v) * 8, acc[r][v]);
}

// xp[r][k] = x[r][k0 + k] as float32 for mr rows (ldx apart), k < kc (xp rows kc apart).
inline void WidenRows(const uint16_t* x, int64_t ldx, int mr, int64_t k0, int64_t kc,
                      float* xp) {
  for (int r = 0; r < mr; ++r) {
    const uint16_t* row = x + r * ldx + k0;
    float* dst = xp + r * kc;
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) _mm256_storeu_ps(dst + k, Load8(row + k));
    for (; k < kc; ++k) dst[k] = Bf16ToF32(row[k]);
  }
}

// A packed panel is four strips of 16 float32 columns, each contiguous for a K block:
// strip j at panel + j * kc * 16, row k of it at + k * 16, so that a microkernel (16
// columns, kc rows: 16 KiB at kKc) streams one strip from L1 without cache-set conflicts.

// Strip j, columns [0, 16), rows k < kc: W[k][16j + i] (rows ld apart; n valid columns,
// zeros past them), widened to float32, for the strips that hold a column below n.
template <typename T>
void PackKN(const T* w, int64_t n, int64_t ld, int64_t kc, float* panel) {
  const int64_t strips = (n + 15) / 16;
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t k = 0; k < kc; ++k) {
    const char* ahead = reinterpret_cast<const char*>(w + (k + kAhead) * ld);
    for (int64_t b = 0; b < row_bytes; b += 64) PrefetchL1(ahead + b);
    const T* src = w + k * ld;
    for (int64_t j = 0; j < strips; ++j) {
      float* dst = panel + (j * kc + k) * 16;
      for (int c = 0; c < 16; c += 8) {
        const int64_t col = 16 * j + c;
        _mm256_storeu_ps(dst + c, n >= col + 8 ? Load8(src + col) : Load8Tail(src + col, n - col));
      }
    }
  }
}

// The gated panel: strip j holds output columns [8j, 8j + 8): the gate's at [0, 8), up's
// at [8, 16), rows k < kc (n valid columns of each, rows ld apart, widened to float32), so
// that a microkernel's gate and up vectors share a cache line.
template <typename T>
void PackGated(const T* gate, const T* up, int64_t n, int64_t ld, int64_t kc, float* panel) {
  const int64_t strips = (n + 7) / 8;
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t k = 0; k < kc; ++k) {
    for (int64_t b = 0; b < row_bytes; b += 64) {
      PrefetchL1(reinterpret_cast<const char*>(gate + (k + kAhead) * ld) + b);
      PrefetchL1(reinterpret_cast<const char*>(up + (k + kAhead) * ld) + b);
    }
    const T* g = gate + k * ld;
    const T* u = up + k * ld;
    for (int64_t j = 0; j < strips; ++j) {
      float* dst = panel + (j * kc + k) * 16;
      const int64_t c = 8 * j;
      _mm256_storeu_ps(dst, n >= c + 8 ? Load8(g + c) : Load8Tail(g + c, n - c));
      _mm256_storeu_ps(dst + 8, n >= c + 8 ? Load8(u + c) : Load8Tail(u + c, n - c));
    }
  }
}

// dst[c][r] = src[r][c] for an 8 x 8 block of float32 (row strides lds, ldd).
inline void Transpose8x8(const __m256 (&r)[8], float* dst, int64_t ldd) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ldd, _mm256_permute2f128_ps(u[j], u[4 + j], 0x20));
    _mm256_storeu_ps(dst + (4 + j) * ldd, _mm256_permute2f128_ps(u[j], u[4 + j], 0x31));
  }
}

// The strips of a transposed panel: column r of strip j is W row 16j + r, i.e. strip j
// row k = w[16j + r][k0 + k] for k < kc (rows of w ld apart; nrows of them, zeros past),
// as float32, for the strips that hold a row below nrows.
template <typename T>
void PackNK(const T* w, int64_t ld, int64_t nrows, int64_t k0, int64_t kc, float* panel) {
  const int64_t full_k = kc / 8 * 8;
  for (int64_t r0 = 0; r0 < (nrows + 15) / 16 * 16; r0 += 8) {
    const int64_t n = std::clamp<int64_t>(nrows - r0, 0, 8);  // rows of this group
    float* dst = panel + (r0 / 16) * kc * 16 + r0 % 16;
    const T* src = w + r0 * ld + k0;
    for (int64_t k = 0; k < full_k; k += 8) {
      __m256 rows[8];
      for (int i = 0; i < 8; ++i) rows[i] = i < n ? Load8(src + i * ld + k) : _mm256_setzero_ps();
      Transpose8x8(rows, dst + k * 16, 16);
    }
    for (int64_t k = full_k; k < kc; ++k)
      for (int i = 0; i < 8; ++i) dst[k * 16 + i] = i < n ? ToF32(src[i * ld + k]) : 0.0f;
  }
}

// How an item's microkernels read a K block of W in place: rows ld apart; plain: columns
// [0, 64) at a + c; gated: the gate's columns at a + c, up's at b + c.
template <typename WT>
struct Source {
  const WT* a;
  const WT* b;
  int64_t ld;
};

// One row block (MR rows of x, ldx apart) over the item's columns for one K block:
// accumulate into the tile, then keep partial sums (part: [rows][64] float32, this block's
// rows; the gate's column c at c, up's at 32 + c) or, on the last K block, write y (plain:
// columns [0, ncols); gated: silu(gate) * up for columns [0, ncols)).
// kPacked: W is a packed panel (strips of 16 columns, kc rows; see PackKN) read one strip
// per microkernel; else W is read in place from `src` (kTail: its columns end at ncols),
// by microkernels as wide as their accumulators allow.
template <int MR, bool kGated, bool kPacked, bool kTail, typename WT, typename YT>
void RowBlock(const float* x, int64_t ldx, const Source<WT>& src, int64_t kc, int64_t ncols,
              bool first, bool last, int64_t ahead, float* part, YT* y, int64_t ldy) {
  constexpr int NV = kPacked ? 2 : kNv<MR>;
  constexpr int64_t kStrip = kGated ? 4 * NV : 8 * NV;  // output columns per microkernel
  alignas(32) float tile[MR * NV * 8];
  for (int64_t s = 0; s < ncols; s += kStrip) {
    // Output column of vector v (plain: s + 8v, or s + 8(v - NV/2) for gated up vectors),
    // its partial-sum column and how many of its 8 columns exist.
    int64_t col[NV], valid[NV];
    for (int v = 0; v < NV; ++v) {
      const int64_t out = s + 8 * (v % (NV / 2)) + (!kGated && v >= NV / 2 ? 4 * NV : 0);
      col[v] = out + (kGated && v >= NV / 2 ? 32 : 0);
      valid[v] = std::min<int64_t>(8, ncols - out);
    }
    const WT* lo = kPacked ? src.a + (s / kStrip) * kc * 16 : src.a + s;
    const WT* hi = kPacked ? lo + 8 : (kGated ? src.b + s : lo + 4 * NV);
    if (!first) {
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v)
          _mm256_storeu_ps(tile + (r * NV + v) * 8, _mm256_loadu_ps(part + r * kPanelCols + col[v]));
    }
    Ukr<MR, NV, WT, kTail>(x, ldx, lo, hi, kPacked ? 16 : src.ld, kc, valid, !first, ahead,
                           tile);
    for (int r = 0; r < MR; ++r) {
      const float* t = tile + r * NV * 8;
      if (!last) {
        for (int v = 0; v < NV; ++v)
          _mm256_storeu_ps(part + r * kPanelCols + col[v], _mm256_loadu_ps(t + v * 8));
      } else if (kGated) {
        for (int v = 0; v < NV / 2; ++v)
          Store8(y + r * ldy + col[v],
                 SiluMul(_mm256_loadu_ps(t + v * 8), _mm256_loadu_ps(t + (v + NV / 2) * 8)),
                 valid[v]);
      } else {
        for (int v = 0; v < NV; ++v)
          Store8(y + r * ldy + col[v], _mm256_loadu_ps(t + v * 8), valid[v]);
      }
    }
  }
}

template <bool kGated, bool kPacked, bool kTail, typename WT, typename YT>
void DispatchRowBlock(int mr, const float* x, int64_t ldx, const Source<WT>& src,
                      int64_t kc, int64_t ncols, bool first, bool last, int64_t ahead,
                      float* part, YT* y, int64_t ldy) {
#define JAXSERVE_ROW_BLOCK(MR)                                                     \
  return RowBlock<MR, kGated, kPacked, kTail>(x, ldx, src, kc, ncols, first, last, \
                                              ahead, part, y, ldy)
  switch (mr) {
    case 1: JAXSERVE_ROW_BLOCK(1);
    case 2: JAXSERVE_ROW_BLOCK(2);
    case 3: JAXSERVE_ROW_BLOCK(3);
    case 4: JAXSERVE_ROW_BLOCK(4);
    case 5: JAXSERVE_ROW_BLOCK(5);
    default: JAXSERVE_ROW_BLOCK(6);
  }
#undef JAXSERVE_ROW_BLOCK
}

// Per-thread buffers of the items, grown on demand.
struct Buffers {
  std::vector<float> panel, xp, part;
  static Buffers& Mine() {
    thread_local Buffers buffers;
    return buffers;
  }
};

// y[rows, ncols] (row r at y + r * ldy) = x[rows, K] (row r at x + r * K) @ a panel of W:
// kNK: rows w[c * K ...] of W [N, K] for columns c < ncols (<= 64); kGated: columns of
// w (the gate) and w2 (up), N apart, ncols <= 32; else columns of W [K, N] at w, ncols <= 64.
template <typename T, typename YT, bool kGated, bool kNK>
void Item(const T* x, const T* w, const T* w2, int64_t K, int64_t N, int64_t rows,
          int64_t ncols, YT* y, int64_t ldy) {
  if (rows <= 0 || ncols <= 0) return;
  const bool pack = kNK || rows > kPackRows;
  Buffers& buf = Buffers::Mine();
  const int64_t kc_max = std::min(K, kKc);
  if (pack && static_cast<int64_t>(buf.panel.size()) < kc_max * kPanelCols)
    buf.panel.resize(kc_max * kPanelCols);
  if (static_cast<int64_t>(buf.xp.size()) < kc_max * kRowBlock) buf.xp.resize(kc_max * kRowBlock);
  if (K > kKc && static_cast<int64_t>(buf.part.size()) < rows * kPanelCols)
    buf.part.resize(rows * kPanelCols);
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    const bool first = k0 == 0, last = k0 + kc >= K;
    if (pack) {
      if (kNK) {
        PackNK(w, K, ncols, k0, kc, buf.panel.data());
      } else if (kGated) {
        PackGated(w + k0 * N, w2 + k0 * N, ncols, N, kc, buf.panel.data());
      } else {
        PackKN(w + k0 * N, ncols, N, kc, buf.panel.data());
      }
    }
    const Source<float> packed{buf.panel.data(), nullptr, 16};
    const Source<T> in_place{w + k0 * N, kGated ? w2 + k0 * N : nullptr, N};
    const bool tail = ncols < (kGated ? 32 : kPanelCols);
    for (int64_t m = 0; m < rows; m += kRowBlock) {
      const int mr = static_cast<int>(std::min<int64_t>(kRowBlock, rows - m));
      const float* xs;  // the row block's K block as float32
      int64_t ldx;
      if constexpr (std::is_same_v<T, float>) {
        xs = x + m * K + k0;
        ldx = K;
      } else {
        WidenRows(x + m * K, K, mr, k0, kc, buf.xp.data());
        xs = buf.xp.data();
        ldx = kc;
      }
      float* part = buf.part.data() + m * kPanelCols;
      YT* ym = y + m * ldy;
      if (pack) {
        DispatchRowBlock<kGated, true, false>(mr, xs, ldx, packed, kc, ncols, first, last, 0,
                                              part, ym, ldy);
      } else if (tail) {
        DispatchRowBlock<kGated, false, true>(mr, xs, ldx, in_place, kc, ncols, first, last,
                                              0, part, ym, ldy);
      } else {
        DispatchRowBlock<kGated, false, false>(mr, xs, ldx, in_place, kc, ncols, first, last,
                                               kAhead, part, ym, ldy);
      }
    }
  }
}

// out[r][c] = x[r] . w[c] along K for MR rows of x and NR rows of w (both K long, T).
template <int MR, int NR, typename T>
__attribute__((always_inline)) inline void DotUkr(const T* x, const T* w, int64_t K,
                                                  float* out) {
  __m256 acc[MR][NR];
  #pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
    #pragma GCC unroll 4
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 a[MR];
    #pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) a[r] = Load8(x + r * K + k);
    #pragma GCC unroll 4
    for (int c = 0; c < NR; ++c) {
      const __m256 b = Load8(w + c * K + k);
      #pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm256_fmadd_ps(a[r], b, acc[r][c]);
    }
  }
  if (k < K) {
    __m256 a[MR];
    for (int r = 0; r < MR; ++r) a[r] = Load8Tail(x + r * K + k, K - k);
    for (int c = 0; c < NR; ++c) {
      const __m256 b = Load8Tail(w + c * K + k, K - k);
      for (int r = 0; r < MR; ++r) acc[r][c] = _mm256_fmadd_ps(a[r], b, acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) out[r * NR + c] = HSum(acc[r][c]);
}

template <int MR, typename T>
void DotRows(const T* x, const T* w, int64_t K, int64_t nrows, float* out) {  // out [MR][4]
  switch (nrows) {
    case 1: return DotUkr<MR, 1>(x, w, K, out);
    case 2: return DotUkr<MR, 2>(x, w, K, out);
    case 3: return DotUkr<MR, 3>(x, w, K, out);
    default: return DotUkr<MR, 4>(x, w, K, out);
  }
}

// y[r][c] = x[r] . w[c] for rows r < rows (K long, x + r * K) and columns c < ncols (rows
// of W [N, K] at w + c * K); y row r at y + r * ldy. Few rows: dot products, W read once
// per 3 rows; otherwise the panels of 64 W rows are packed transposed (Item).
template <typename T, typename YT>
void NKBlock(const T* x, const T* w, YT* y, int64_t K, int64_t rows, int64_t ncols,
             int64_t ldy) {
  if (rows > kNkDotRows) {
    for (int64_t c0 = 0; c0 < ncols; c0 += kPanelCols)
      Item<T, YT, false, true>(x, w + c0 * K, nullptr, K, 0, rows,
                               std::min<int64_t>(kPanelCols, ncols - c0), y + c0, ldy);
    return;
  }
  float out[3 * 4];
  for (int64_t c = 0; c < ncols; c += 4) {
    const int64_t nr = std::min<int64_t>(4, ncols - c);
    for (int64_t r = 0; r < rows; r += 3) {
      const int64_t mr = std::min<int64_t>(3, rows - r);
      switch (mr) {
        case 1: DotRows<1>(x + r * K, w + c * K, K, nr, out); break;
        case 2: DotRows<2>(x + r * K, w + c * K, K, nr, out); break;
        default: DotRows<3>(x + r * K, w + c * K, K, nr, out); break;
      }
      for (int64_t i = 0; i < mr; ++i)
        for (int64_t j = 0; j < nr; ++j) y[(r + i) * ldy + c + j] = FromF32<YT>(out[i * nr + j]);
    }
  }
}

// Whether some of columns [0, ncols) of a row beat (best, first index): a value above
// `best` or a NaN (the rare case; the caller then folds the row in order).
inline bool AnyAbove(const float* row, int64_t ncols, float best) {
  const __m256 b = _mm256_set1_ps(best);
  int64_t c = 0;
  __m256 hit = _mm256_setzero_ps();
  for (; c + 8 <= ncols; c += 8)
    hit = _mm256_or_ps(hit, _mm256_cmp_ps(_mm256_loadu_ps(row + c), b, _CMP_NLE_UQ));
  if (_mm256_movemask_ps(hit)) return true;
  for (; c < ncols; ++c)
    if (!(row[c] <= best)) return true;
  return false;
}

}  // namespace avx2
}  // namespace jaxserve_cpu

#endif  // __AVX2__ && __FMA__
#endif  // JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_AVX2_H_
