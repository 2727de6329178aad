// The portable path of matmul.cc: plain loop nests summing in float32, for targets without
// a SIMD path (see matmul_common.h), such as x86-64-v2 and aarch64.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_SCALAR_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_SCALAR_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace jaxserve_cpu {
namespace matmul {
namespace {

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

}  // namespace
}  // namespace matmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_SCALAR_H_
