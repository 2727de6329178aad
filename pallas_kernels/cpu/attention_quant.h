// The 8-bit KV pools of ragged_paged_attention.cc: rows of float8_e4m3fn or int8 values,
// each with a float16 scale (pallas_kernels/ragged_paged_attention/kv_quant.py), widened
// page by page into float rows the score and value loops read as they read float pools.
// AVX2 where the build has it (int8 by sign extension, e4m3 through a 256-entry table
// gather), a portable loop otherwise; scales widen with F16C where the build has it, else
// bit by bit. Every path gives the same floats (one exact widening, one product per value).

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_ATTENTION_QUANT_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_ATTENTION_QUANT_H_

#include <cmath>
#include <cstdint>

#include "common.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace jaxserve_cpu {
namespace attention_quant {

enum class KvKind { kFloat, kF8E4M3, kInt8 };

// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, and
// S.1111.111 is NaN.
inline float F8E4M3ToF32(uint8_t bits) {
  const int exponent = (bits >> 3) & 0xF, mantissa = bits & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    magnitude = NAN;
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: m / 8 * 2^-6
  } else {
    magnitude = std::ldexp(1.f + mantissa / 8.f, exponent - 7);
  }
  return (bits & 0x80) ? -magnitude : magnitude;
}

using jaxserve_cpu::F16ToF32;  // common.h

struct F8Table {
  F8Table() {
    for (int i = 0; i < 256; ++i) value[i] = F8E4M3ToF32(static_cast<uint8_t>(i));
  }
  float value[256];
};

// Every e4m3 bit pattern's float, built once (thread-safe static initialisation).
inline const float* F8Values() {
  static const F8Table table;
  return table.value;
}

// out[r * head_dim + h] = value(src[r * head_dim + h]) * scales[r] for `count` rows;
// `scales` holds float16 bit patterns.
inline void Dequantize(KvKind kind, const uint8_t* src, const uint16_t* scales, int count,
                       int head_dim, float* out) {
  const float* f8 = kind == KvKind::kF8E4M3 ? F8Values() : nullptr;
  for (int r = 0; r < count; ++r) {
    const uint8_t* in = src + static_cast<int64_t>(r) * head_dim;
    float* row = out + static_cast<int64_t>(r) * head_dim;
    const float scale = F16ToF32(scales[r]);
    int h = 0;
#ifdef __AVX2__
    const __m256 vscale = _mm256_set1_ps(scale);
    for (; h + 8 <= head_dim; h += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + h));
      const __m256 widened =
          f8 ? _mm256_i32gather_ps(f8, _mm256_cvtepu8_epi32(bytes), 4)
             : _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      _mm256_storeu_ps(row + h, _mm256_mul_ps(widened, vscale));
    }
#endif
    for (; h < head_dim; ++h)
      row[h] = (f8 ? f8[in[h]] : static_cast<float>(static_cast<int8_t>(in[h]))) * scale;
  }
}

}  // namespace attention_quant
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_ATTENTION_QUANT_H_
