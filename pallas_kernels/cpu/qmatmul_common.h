// The quantized GEMM's problem, its portable loops and the group sums of x (qmatmul.cc).

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_COMMON_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_COMMON_H_

#include <cstdint>
#include <vector>

namespace jaxserve_cpu {
namespace qmatmul {

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
inline std::vector<float> GroupSums(const Problem& p) {
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

}  // namespace qmatmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_QMATMUL_COMMON_H_
