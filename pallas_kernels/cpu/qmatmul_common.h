// The quantized GEMM's problem, its portable loops, the group sums of x and the reads of
// its scales and mins (float32, or float16 bits widened exactly) (qmatmul.cc).

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_COMMON_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_COMMON_H_

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <vector>

#include "common.h"

namespace jaxserve_cpu {
namespace qmatmul {

constexpr int64_t kPanel = 16;  // columns per micro-kernel call
constexpr int kMr = 4;          // rows per micro-kernel call

// S, the scales' and mins' element: float (float32) or uint16_t (float16 bits).
template <typename S>
struct Problem {
  const float* x;   // [M, K]
  const uint8_t* q; // [K, N] bytes (int8) or [K/2, N] (int4)
  const S* scales;  // [G, N]
  const S* mins;    // [G, N] or nullptr
  float* y;         // [M, N]: y[m, n] at y[m * ldy + n - y0] (see Out)
  int64_t M, K, N, G, g;
  int64_t ldy, y0;  // y's row stride and first column: N and 0, or a scratch's
};

// Where y[m, n] goes.
template <typename S>
inline float* Out(const Problem<S>& p, int64_t m, int64_t n) {
  return p.y + m * p.ldy + (n - p.y0);
}

// One scale or min as float32.
inline float Widen(float v) { return v; }
inline float Widen(uint16_t v) { return F16ToF32(v); }

#if defined(__AVX2__) && defined(__FMA__)
// 8 scales or mins from `p` as float32 lanes (F16C where the build has it).
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {
#ifdef __F16C__
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(32) float f[8];
  for (int i = 0; i < 8; ++i) f[i] = F16ToF32(p[i]);
  return _mm256_load_ps(f);
#endif
}
#endif

#if defined(__AVX512F__)
// 16 scales or mins from `p` as float32 lanes.
inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 Load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// sum of x over each group: xsum[m * G + gi], for the min terms
template <typename S>
inline std::vector<float> GroupSums(const Problem<S>& p) {
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
template <bool kInt4, bool kMin, typename S>
inline int32_t Q(const Problem<S>& p, int64_t k, int64_t n) {
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
template <bool kInt4, bool kMin, typename S>
void BlockScalar(const Problem<S>& p, const float* xsum, int64_t m0, int64_t m1, int64_t n0,
                 int64_t n1) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float out = 0.0f;
      for (int64_t gi = 0; gi < p.G; ++gi) {
        float acc = 0.0f;
        for (int64_t k = gi * p.g; k < (gi + 1) * p.g; ++k)
          acc += p.x[m * p.K + k] * static_cast<float>(Q<kInt4, kMin>(p, k, n));
        out += acc * Widen(p.scales[gi * p.N + n]);
        if constexpr (kMin) out += xsum[m * p.G + gi] * Widen(p.mins[gi * p.N + n]);
      }
      *Out(p, m, n) = out;
    }
}

}  // namespace qmatmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_COMMON_H_
