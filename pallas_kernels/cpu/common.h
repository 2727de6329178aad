// Helpers shared by the native CPU kernels: scalar bfloat16 and float16 -> float32
// conversions, a cache prefetch hint, e^x on 16 (AVX-512) or 8 (AVX2) lanes, and the
// parallel loops on XLA's intra-op pool (threading.h). Every .cc of this directory is built
// on its own; build.py hashes every header of the directory into each library's cache key,
// so a change to one rebuilds them all.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_COMMON_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_COMMON_H_

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "threading.h"

namespace jaxserve_cpu {

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A hint to bring the cache line of `p` into L1 (prefetcht0 on x86); any architecture.
inline void PrefetchL1(const void* p) { __builtin_prefetch(p, 0, 3); }
// The same into L2 (prefetcht1): for data needed later than the current loop's.
inline void PrefetchL2(const void* p) { __builtin_prefetch(p, 0, 2); }

inline uint16_t F32ToBf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// float16 bits -> float32 (exact): F16C where the build has it, else bit by bit.
// float16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
inline float F16ToF32(uint16_t bits) {
#ifdef __F16C__
  return _cvtsh_ss(bits);
#else
  const int exponent = (bits >> 10) & 0x1F, mantissa = bits & 0x3FF;
  float magnitude;
  if (exponent == 0x1F) {
    magnitude = mantissa ? NAN : INFINITY;
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal: m * 2^-24
  } else {
    magnitude = std::ldexp(static_cast<float>(1024 + mantissa), exponent - 25);
  }
  return (bits & 0x8000) ? -magnitude : magnitude;
#endif
}

// bf16 (uint16_t) or float32 <-> float32.
template <typename T> inline float ToF32(T v);
template <> inline float ToF32<float>(float v) { return v; }
template <> inline float ToF32<uint16_t>(uint16_t v) { return Bf16ToF32(v); }
template <typename T> inline T FromF32(float v);
template <> inline float FromF32<float>(float v) { return v; }
template <> inline uint16_t FromF32<uint16_t>(float v) { return F32ToBf16(v); }

#ifdef __AVX512F__
// exp(v) per lane (Cephes expf: Cody-Waite reduction by ln 2, degree-6 polynomial, then
// vscalefps by 2^n, which also gives inf / 0 past the float range): ~1 ulp.
inline __m512 Exp512(__m512 v) {
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-100.0f)), _mm512_set1_ps(100.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// exp(v) per lane, as Exp512, with 2^n built in the exponent bits: v is clamped to
// [-87, 88] so that n stays a normal exponent (e^-87 ~ 1.6e-38 stands for 0, e^88 ~ 1.7e38
// for inf).
inline __m256 Exp256(__m256 v) {
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_COMMON_H_
