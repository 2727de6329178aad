// The LM head + argmax of the lm_head_argmax handlers: idx[m] = argmax_n (x @ W^T)[m, n]
// for W [N, K] (a tied LM head), with jnp.argmax's rule (the first NaN if a row has one,
// else the first of the largest), the logits never written; with a packed mask [M, W]
// (structured outputs), the ids whose bit is clear count as -inf. Work items are (block of up
// to kArgmaxBlock W rows x row chunk);
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

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_ARGMAX_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_ARGMAX_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "matmul_blocks.h"
#include "matmul_pack.h"

namespace jaxserve_cpu {
namespace matmul {
namespace {

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

// -inf for the columns [0, ncols) of a buffer row (column c is logit n0, a multiple of 32,
// plus c) whose bit is clear in the row's packed mask `words` (bit i of word w: id 32 w + i).
inline void MaskArgmaxRow(float* row, int64_t ncols, int64_t n0, const int32_t* words) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(words) + n0 / 32;
  for (int64_t c0 = 0; c0 < ncols; c0 += 32) {
    const uint32_t word = bits[c0 / 32];
    if (word == 0xFFFFFFFFu) continue;  // all allowed: the common word
    const int64_t c1 = std::min<int64_t>(ncols, c0 + 32);
    for (int64_t c = c0; c < c1; ++c)
      if (!((word >> (c - c0)) & 1u)) row[c] = -std::numeric_limits<float>::infinity();
  }
}

// Prefetches lines [l0, l1) of `rows` W rows of `row_bytes` each from `src` (line l: row
// l / lines_per_row).
inline void PrefetchRowLines(const char* src, int64_t row_bytes, int64_t l0, int64_t l1) {
  const int64_t per_row = CeilDiv(row_bytes, 64);
  for (int64_t l = l0; l < l1; ++l)
    PrefetchL1(src + (l / per_row) * row_bytes + (l % per_row) * 64);
}

// Folds the buffer's rows (x rows m0 + m) into their running (best, idx), each masked
// first by its row of `mask` [M, mask_words] when there is one.
inline void FoldArgmaxRows(float* buf, int64_t mr, int64_t ncols, int64_t n0, float* best,
                           int32_t* idx, const int32_t* mask, int64_t mask_words, int64_t m0) {
  for (int64_t m = 0; m < mr; ++m) {
    float* row = buf + m * kArgmaxPanel;
    if (mask) MaskArgmaxRow(row, ncols, n0, mask + (m0 + m) * mask_words);
    FoldArgmaxRow(row, ncols, n0, best[m], idx[m]);
  }
}

template <typename T, bool kKN = false>
void RunLmHeadArgmax(xla::ffi::ThreadPool& pool, const T* x, const T* w, int32_t* out,
                     int64_t M, int64_t K, int64_t N, const int32_t* mask = nullptr,
                     int64_t mask_words = 0) {
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
        FoldArgmaxRows(buf.data(), mr, ncols, n0, best, idx, mask, mask_words, m0);
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
      FoldArgmaxRows(buf.data(), mr, ncols, n0, best, idx, mask, mask_words, m0);
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

}  // namespace
}  // namespace matmul
}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_MATMUL_ARGMAX_H_
