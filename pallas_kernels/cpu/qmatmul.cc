// y[M, N] = x[M, K] @ W with W quantized along K, as XLA CPU FFI handlers, float32 out.
//
// W is integers q plus, per group of g rows of K and per column, a float32 scale and
// optionally a min: w = q * scale + min, or w = (q - zero) * scale (zero: 0 for int8, 8 for
// int4). Handlers (registered as "jaxserve_<symbol>"), each with rows s32 [1] last:
//   qmatmul_i8      x f32 [M, K], q s8 [K, N], scales f32 [G, N]              -> y f32 [M, N]
//   qmatmul_i8_min  x f32 [M, K], q s8 [K, N], scales, mins f32 [G, N]        -> y f32 [M, N]
//   qmatmul_i4      x f32 [M, K], q u8 [K/2, N], scales f32 [G, N]            -> y f32 [M, N]
//   qmatmul_i4_min  x f32 [M, K], q u8 [K/2, N], scales, mins f32 [G, N]      -> y f32 [M, N]
// int4 byte (i, n) holds q[2i, n] in its low nibble and q[2i + 1, n] in its high one.
// Only the first min(max(rows[0], 0), M) rows are computed; the rest of y is zeros.
//
// The weights are dequantized in the micro-kernel: each 16-column panel converts its q to
// float32 in registers and accumulates x * q per group, then adds acc * scale (+ the
// group's sum of x times min) into y. Paths: AVX-512 (one vector per panel), AVX2 + FMA
// (two), and portable loops for the rest (and for the last N % 16 columns).

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "threading.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;  // columns per micro-kernel call
constexpr int kMr = 4;          // rows per micro-kernel call

struct Problem {
  const float* x;       // [M, K]
  const uint8_t* q;     // [K, N] bytes (int8) or [K/2, N] (int4)
  const float* scales;  // [G, N]
  const float* mins;    // [G, N] or nullptr
  float* y;             // [M, N]
  int64_t M, K, N, G, g;
};

// sum of x over each group: xsum[m * G + gi], for the min terms
std::vector<float> GroupSums(const Problem& p) {
  std::vector<float> sums(p.M * p.G, 0.0f);
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t gi = 0; gi < p.G; ++gi) {
      float s = 0.0f;
      for (int64_t k = gi * p.g; k < (gi + 1) * p.g; ++k) s += p.x[m * p.K + k];
      sums[m * p.G + gi] = s;
    }
  return sums;
}

// q[k, n] as an integer (zero point subtracted in the symmetric forms).
template <bool kInt4, bool kMin>
inline int32_t Q(const Problem& p, int64_t k, int64_t n) {
  if constexpr (kInt4) {
    const uint8_t byte = p.q[(k / 2) * p.N + n];
    const int32_t v = (k % 2) ? (byte >> 4) : (byte & 0xF);
    return kMin ? v : v - 8;
  } else {
    const int32_t v = static_cast<int8_t>(p.q[k * p.N + n]);
    return v;
  }
}

// Portable loops: rows [m0, m1) x columns [n0, n1).
template <bool kInt4, bool kMin>
void BlockScalar(const Problem& p, const float* xsum, int64_t m0, int64_t m1, int64_t n0,
                 int64_t n1) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float out = 0.0f;
      for (int64_t gi = 0; gi < p.G; ++gi) {
        float acc = 0.0f;
        for (int64_t k = gi * p.g; k < (gi + 1) * p.g; ++k)
          acc += p.x[m * p.K + k] * static_cast<float>(Q<kInt4, kMin>(p, k, n));
        out += acc * p.scales[gi * p.N + n];
        if constexpr (kMin) out += xsum[m * p.G + gi] * p.mins[gi * p.N + n];
      }
      p.y[m * p.N + n] = out;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// One 16-column panel: rows [m0, m0 + MR), one zmm per row.
template <int MR, bool kInt4, bool kMin>
void Panel(const Problem& p, const float* xsum, int64_t m0, int64_t n0) {
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
    const __m512 scale = _mm512_loadu_ps(p.scales + gi * p.N + n0);
    for (int m = 0; m < MR; ++m) out[m] = _mm512_fmadd_ps(acc[m], scale, out[m]);
    if constexpr (kMin) {
      const __m512 mn = _mm512_loadu_ps(p.mins + gi * p.N + n0);
      for (int m = 0; m < MR; ++m)
        out[m] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[(m0 + m) * p.G + gi]), mn, out[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(p.y + (m0 + m) * p.N + n0, out[m]);
}
#define JAXSERVE_QMATMUL_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
// One 16-column panel: rows [m0, m0 + MR), two ymm per row.
template <int MR, bool kInt4, bool kMin>
void Panel(const Problem& p, const float* xsum, int64_t m0, int64_t n0) {
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
      const __m256 scale = _mm256_loadu_ps(p.scales + gi * p.N + n0 + 8 * c);
      for (int m = 0; m < MR; ++m) out[m][c] = _mm256_fmadd_ps(acc[m][c], scale, out[m][c]);
      if constexpr (kMin) {
        const __m256 mn = _mm256_loadu_ps(p.mins + gi * p.N + n0 + 8 * c);
        for (int m = 0; m < MR; ++m)
          out[m][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(xsum + (m0 + m) * p.G + gi), mn,
                                      out[m][c]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 2; ++c) _mm256_storeu_ps(p.y + (m0 + m) * p.N + n0 + 8 * c, out[m][c]);
}
#define JAXSERVE_QMATMUL_SIMD 1
#endif

// One work item: a 16-column panel (or the last, narrower one) over every row.
template <bool kInt4, bool kMin>
void Item(const Problem& p, const float* xsum, int64_t panel) {
  const int64_t n0 = panel * kPanel, n1 = std::min(n0 + kPanel, p.N);
#ifdef JAXSERVE_QMATMUL_SIMD
  if (n1 - n0 == kPanel) {
    int64_t m = 0;
    for (; m + kMr <= p.M; m += kMr) Panel<kMr, kInt4, kMin>(p, xsum, m, n0);
    switch (p.M - m) {
      case 3: Panel<3, kInt4, kMin>(p, xsum, m, n0); break;
      case 2: Panel<2, kInt4, kMin>(p, xsum, m, n0); break;
      case 1: Panel<1, kInt4, kMin>(p, xsum, m, n0); break;
      default: break;
    }
    return;
  }
#endif
  BlockScalar<kInt4, kMin>(p, xsum, 0, p.M, n0, n1);
}

using RowsBuffer = ffi::Buffer<ffi::DataType::S32, 1>;
using F32Matrix = ffi::Buffer<ffi::DataType::F32, 2>;

template <bool kInt4, bool kMin, ffi::DataType QDT>
ffi::Error QMatmulImpl(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q,
                       F32Matrix scales, const float* mins, RowsBuffer rows,
                       ffi::ResultBuffer<ffi::DataType::F32, 2> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = scales.dimensions();
  const int64_t M = xd[0], K = xd[1], N = qd[1], G = sd[0];
  if ((kInt4 ? 2 * qd[0] : qd[0]) != K || sd[1] != N || G < 1 || K % G != 0 ||
      y->dimensions()[0] != M || y->dimensions()[1] != N || (kInt4 && (K / G) % 2))
    return ffi::Error::InvalidArgument("qmatmul: inconsistent shapes of x, q, scales and y");
  float* yp = y->typed_data();
  const int64_t valid =
      rows.element_count() < 1 ? M : std::clamp<int64_t>(rows.typed_data()[0], 0, M);
  if (valid < M) std::memset(yp + valid * N, 0, sizeof(float) * (M - valid) * N);
  if (valid == 0 || N == 0) return ffi::Error::Success();
  const Problem p{x.typed_data(), reinterpret_cast<const uint8_t*>(q.untyped_data()),
                  scales.typed_data(), mins, yp, valid, K, N, G, K / G};
  const std::vector<float> xsum = kMin ? GroupSums(p) : std::vector<float>();
  const float* sums = xsum.data();
  jaxserve_cpu::ParallelFor(pool, (N + kPanel - 1) / kPanel,
                            [&p, sums](int64_t panel) { Item<kInt4, kMin>(p, sums, panel); });
  return ffi::Error::Success();
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error Symmetric(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q, F32Matrix s,
                     RowsBuffer rows, ffi::ResultBuffer<ffi::DataType::F32, 2> y) {
  return QMatmulImpl<kInt4, false, QDT>(pool, x, q, s, nullptr, rows, y);
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error WithMin(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q, F32Matrix s,
                   F32Matrix mins, RowsBuffer rows, ffi::ResultBuffer<ffi::DataType::F32, 2> y) {
  if (mins.dimensions()[0] != s.dimensions()[0] || mins.dimensions()[1] != s.dimensions()[1])
    return ffi::Error::InvalidArgument("qmatmul: mins must have the shape of scales");
  return QMatmulImpl<kInt4, true, QDT>(pool, x, q, s, mins.typed_data(), rows, y);
}

}  // namespace

using S8Matrix = ffi::Buffer<ffi::DataType::S8, 2>;
using U8Matrix = ffi::Buffer<ffi::DataType::U8, 2>;
constexpr auto kI8 = Symmetric<false, ffi::DataType::S8>;
constexpr auto kI4 = Symmetric<true, ffi::DataType::U8>;
constexpr auto kI8Min = WithMin<false, ffi::DataType::S8>;
constexpr auto kI4Min = WithMin<true, ffi::DataType::U8>;

#define JAXSERVE_QMATMUL_HANDLER(symbol, impl, qbuffer)                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                     \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<qbuffer>()                               \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<RowsBuffer>()                            \
                                    .Ret<F32Matrix>());
#define JAXSERVE_QMATMUL_MIN_HANDLER(symbol, impl, qbuffer)                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                     \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<qbuffer>()                               \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<RowsBuffer>()                            \
                                    .Ret<F32Matrix>());

#pragma GCC visibility push(default)
JAXSERVE_QMATMUL_HANDLER(qmatmul_i8, kI8, S8Matrix)
JAXSERVE_QMATMUL_HANDLER(qmatmul_i4, kI4, U8Matrix)
JAXSERVE_QMATMUL_MIN_HANDLER(qmatmul_i8_min, kI8Min, S8Matrix)
JAXSERVE_QMATMUL_MIN_HANDLER(qmatmul_i4_min, kI4Min, U8Matrix)
#pragma GCC visibility pop
