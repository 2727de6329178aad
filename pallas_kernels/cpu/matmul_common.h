// What the parts of the matmul kernels (matmul.cc) share: the code path a build takes, the
// kn microkernels' row count, the prefetch plan for weights streamed from memory, and how
// M is split into row chunks.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_COMMON_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_COMMON_H_

#include <algorithm>
#include <cstdint>

#include "common.h"

// The code path, by the target's instruction sets (build.py's PATH_MACROS):
//   JAXSERVE_AVX512      AVX512F + BW + VL: the float32 kernels of matmul_avx512.h;
//   JAXSERVE_AVX512BF16  that and AVX512_BF16: the bfloat16 kernels of matmul_avx512_bf16.h;
//   JAXSERVE_AVX2        AVX2 + FMA (defined by matmul_avx2.h): float32 without AVX-512,
//                        bfloat16 without AVX512_BF16;
//   else the portable loops of matmul_scalar.h.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define JAXSERVE_AVX512 1
#endif
#if defined(JAXSERVE_AVX512) && defined(__AVX512BF16__)
#define JAXSERVE_AVX512BF16 1
#endif

namespace jaxserve_cpu {
namespace matmul {
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
// panel. Both pay where the weights come from memory (beyond the L3, as in the engine) and
// cost little where they are cached.
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

}  // namespace
}  // namespace matmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_COMMON_H_
