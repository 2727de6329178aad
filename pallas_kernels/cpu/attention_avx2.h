// The AVX2 + FMA loops of ragged_paged_attention.cc: scores, the softmax's max and
// exponentials, and the value accumulation of one query row over one page, 8 lanes wide,
// for head dims that are a multiple of 8. Used where AVX-512 is missing.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_ATTENTION_AVX2_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_ATTENTION_AVX2_H_

#if defined(__AVX2__) && defined(__FMA__)
#define JAXSERVE_ATTENTION_AVX2 1

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"

namespace jaxserve_cpu {
namespace attention_avx2 {

// Lane l of the result is the sum of v[l]'s lanes (8 horizontal sums at once).
inline __m256 Reduce8(const __m256 (&v)[8]) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

// s[c + j] = q . k[c + j] for the n (<= 8) keys from c; kFull: n == 8. Keys past n are
// never read (they may be outside the page).
template <bool kFull>
inline void Scores8(const float* q, const float* keys, int head_dim, int c, int n, float* s) {
  __m256 acc[8];
  #pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  const float* k0 = keys + static_cast<int64_t>(c) * head_dim;
  for (int h = 0; h < head_dim; h += 8) {
    const __m256 qv = _mm256_loadu_ps(q + h);
    #pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
      if (kFull || j < n)
        acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + static_cast<int64_t>(j) * head_dim + h),
                                 acc[j]);
  }
  const __m256 sums = Reduce8(acc);
  if (kFull) {
    _mm256_storeu_ps(s + c, sums);
  } else {
    alignas(32) float out[8];
    _mm256_store_ps(out, sums);
    std::copy(out, out + n, s + c);
  }
}

// s[j] = q . k[j] for keys [a, b) (rows head_dim apart; head_dim % 8 == 0).
inline void Scores(const float* q, const float* keys, int head_dim, int a, int b, float* s) {
  int c = a;
  for (; c + 8 <= b; c += 8) Scores8<true>(q, keys, head_dim, c, 8, s);
  if (c < b) Scores8<false>(q, keys, head_dim, c, b - c, s);
}

// The largest of s[a, b).
inline float RowMax(const float* s, int a, int b) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int j = a;
  for (; j + 8 <= b; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  float best = std::max(_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehdup_ps(h)));
  for (; j < b; ++j) best = std::max(best, s[j]);
  return best;
}

// prob[j] = exp(s[j] - m) for j in [a, b); returns their sum.
inline float ExpSum(const float* s, float m, int a, int b, float* prob) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  int j = a;
  for (; j + 8 <= b; j += 8) {
    const __m256 e = Exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(prob + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(vsum), _mm256_extractf128_ps(vsum, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  float sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  for (; j < b; ++j) {
    prob[j] = std::exp(s[j] - m);
    sum += prob[j];
  }
  return sum;
}

// acc[h0 + i] = alpha * acc[h0 + i] + sum_{j in [a, b)} p[j] * v[j][h0 + i], i < 8 * NV.
template <int NV>
inline void AccumulateChunk(float* acc, float alpha, const float* p, const float* values,
                            int head_dim, int h0, int a, int b) {
  __m256 r[NV];
  const __m256 va = _mm256_set1_ps(alpha);
  #pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) r[i] = _mm256_mul_ps(va, _mm256_loadu_ps(acc + h0 + 8 * i));
  for (int j = a; j < b; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    const float* vj = values + static_cast<int64_t>(j) * head_dim + h0;
    #pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) r[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * i), r[i]);
  }
  #pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(acc + h0 + 8 * i, r[i]);
}

// acc = alpha * acc + sum_{j in [a, b)} p[j] * v[j], 64 columns at a time (8 accumulators:
// independent FMA chains, and room for the loads); head_dim % 8 == 0.
inline void Accumulate(float* acc, float alpha, const float* p, const float* values,
                       int head_dim, int a, int b) {
  for (int h0 = 0; h0 < head_dim; h0 += 64) {
    switch (std::min(8, (head_dim - h0) / 8)) {
      case 1: AccumulateChunk<1>(acc, alpha, p, values, head_dim, h0, a, b); break;
      case 2: AccumulateChunk<2>(acc, alpha, p, values, head_dim, h0, a, b); break;
      case 3: AccumulateChunk<3>(acc, alpha, p, values, head_dim, h0, a, b); break;
      case 4: AccumulateChunk<4>(acc, alpha, p, values, head_dim, h0, a, b); break;
      case 5: AccumulateChunk<5>(acc, alpha, p, values, head_dim, h0, a, b); break;
      case 6: AccumulateChunk<6>(acc, alpha, p, values, head_dim, h0, a, b); break;
      case 7: AccumulateChunk<7>(acc, alpha, p, values, head_dim, h0, a, b); break;
      default: AccumulateChunk<8>(acc, alpha, p, values, head_dim, h0, a, b); break;
    }
  }
}

// out[i] = in[i] as float32 for i < n (bfloat16 -> float32); returns how many it did (a
// multiple of 8), the caller converts the rest.
inline int64_t Widen(const uint16_t* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i,
                     _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  return i;
}

}  // namespace attention_avx2
}  // namespace jaxserve_cpu

#endif  // __AVX2__ && __FMA__
#endif  // JAXSERVE_PALLAS_KERNELS_CPU_ATTENTION_AVX2_H_
