// Ragged paged attention for XLA:CPU, as an XLA FFI handler.
//
// Same contract as pallas_kernels/ragged_paged_attention/reference.py: the queries of all
// sequences of a step are flattened into T, grouped by query_start_loc, and each sequence
// attends causally over its context, read in place from the [K, P, S, H] key and value
// pools through its row of page_indices (no gather copy). One work item is (sequence, KV
// head, block of query tokens); items are claimed by the caller and XLA's intra-op pool.
// Inside an item the context streams page by page with an online softmax; a page's keys
// and values stay in L1 while every query row of the item (tokens x grouped heads) uses
// them. Slots after a sequence's length are never read, so NaN in unused pages is harmless.
// 8-bit pools (float8_e4m3fn or int8 with [K, P, S] float16 row scales) are widened page
// by page into float rows (attention_quant.h), like bfloat16 pools.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "attention_avx2.h"
#include "attention_quant.h"
#include "common.h"

namespace ffi = xla::ffi;
using jaxserve_cpu::Bf16ToF32;
using jaxserve_cpu::F32ToBf16;
using jaxserve_cpu::NumWorkers;
using jaxserve_cpu::ParallelFor;
using jaxserve_cpu::attention_quant::KvKind;
#ifdef __AVX512F__
using jaxserve_cpu::Exp512;
#endif

namespace {

constexpr int kMaxRows = 64;  // query rows (tokens x grouped heads) of one work item

struct Problem {
  int num_tokens, num_heads, head_dim, num_kv_heads, num_pages, page_size;
  int num_seqs, pages_per_seq;
  bool bf16;       // q and the output (and float pools) are bfloat16, else float32
  KvKind kv_kind;  // kFloat: the pools have q's dtype; else 8-bit rows with scales
  int kv_itemsize;  // bytes per pool element
  const void* q;  // [T, N, H]
  const void* k;  // [K, P, S, H]
  const void* v;  // [K, P, S, H]
  const uint16_t* k_scale;  // [K, P, S] float16 bits (8-bit pools) or nullptr
  const uint16_t* v_scale;  // [K, P, S] float16 bits (8-bit pools) or nullptr
  const int32_t* page_indices;     // [B, pages_per_seq]
  const int32_t* seq_lens;         // [B]
  const int32_t* query_start_loc;  // [B + 1]
  const float* alibi;              // [N] or nullptr
  float sm_scale, soft_cap;        // soft_cap 0: none
  int sliding_window;              // 0: none
  void* out;                       // [T, N, H]
};

struct Item {
  int seq, kv_head, first_token, num_tokens;
};

// Reads `count` rows of `head_dim` values starting at `src` (float, bf16 or 8-bit with
// `scales`, indexed by row) as float.
inline const float* AsFloat(const Problem& p, const void* src, const uint16_t* scales,
                            int64_t offset, int count, float* scratch) {
  if (p.kv_kind != KvKind::kFloat) {
    jaxserve_cpu::attention_quant::Dequantize(p.kv_kind, static_cast<const uint8_t*>(src) + offset,
                                              scales + offset / p.head_dim, count, p.head_dim,
                                              scratch);
    return scratch;
  }
  if (!p.bf16) return static_cast<const float*>(src) + offset;
  const uint16_t* in = static_cast<const uint16_t*>(src) + offset;
  const int64_t n = static_cast<int64_t>(count) * p.head_dim;
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) {  // bf16 -> f32 is a 16-bit shift into the high half
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    _mm512_storeu_ps(scratch + i, _mm512_castsi512_ps(
                                      _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
  }
#elif defined(JAXSERVE_ATTENTION_AVX2)
  i = jaxserve_cpu::attention_avx2::Widen(in, n, scratch);
#endif
  for (; i < n; ++i) scratch[i] = Bf16ToF32(in[i]);
  return scratch;
}

#ifdef __AVX512F__
// Sums each of 16 vectors: lane l of the result is the sum of v[kSlot[l]] (45 instructions
// instead of 16 separate horizontal reductions). kSlot is its own inverse.
constexpr int kSlot[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

inline __m512 Reduce16(const __m512* v) {
  __m512 u[8], x[4], y[2];
  for (int j = 0; j < 8; ++j)
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[j], v[j + 8], 0x44),
                         _mm512_shuffle_f32x4(v[j], v[j + 8], 0xEE));
  for (int j = 0; j < 4; ++j)
    x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[j], u[j + 4], 0x88),
                         _mm512_shuffle_f32x4(u[j], u[j + 4], 0xDD));
  for (int j = 0; j < 2; ++j)
    y[j] = _mm512_add_ps(_mm512_shuffle_ps(x[j], x[j + 2], 0x44),
                         _mm512_shuffle_ps(x[j], x[j + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// s[j] = q . k[j] for keys [a, b), 16 keys per reduction; NV = head_dim / 16.
template <int NV>
inline void Scores16(const float* q, const float* keys, int a, int b, float* s) {
  __m512 qv[NV];
  for (int i = 0; i < NV; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
  for (int c = a; c < b; c += 16) {
    const int n = std::min(16, b - c);
    __m512 v[16];
    for (int j = 0; j < 16; ++j) {
      __m512 acc = _mm512_setzero_ps();
      if (j < n) {
        const float* kj = keys + static_cast<int64_t>(c + j) * (16 * NV);
        for (int i = 0; i < NV; ++i) acc = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(kj + 16 * i), acc);
      }
      v[kSlot[j]] = acc;
    }
    _mm512_mask_storeu_ps(s + c, static_cast<__mmask16>((1u << n) - 1u), Reduce16(v));
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// bfloat16 pools: s[j] = scale * (q . k[j]) straight from the bf16 rows with vdpbf16ps (the
// products of two bf16 values are exact in float32, so only the float32 sums round, as in
// the converted path); NV2 = head_dim / 32.
template <int NV2>
inline void Scores16Bf16(const uint16_t* q, const uint16_t* keys, int a, int b, float scale,
                         float* s) {
  __m512bh qv[NV2];
  for (int i = 0; i < NV2; ++i) qv[i] = (__m512bh)_mm512_loadu_si512(q + 32 * i);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int c = a; c < b; c += 16) {
    const int n = std::min(16, b - c);
    __m512 v[16];
    for (int j = 0; j < 16; ++j) {
      __m512 acc = _mm512_setzero_ps();
      if (j < n) {
        const uint16_t* kj = keys + static_cast<int64_t>(c + j) * (32 * NV2);
        for (int i = 0; i < NV2; ++i)
          acc = _mm512_dpbf16_ps(acc, qv[i], (__m512bh)_mm512_loadu_si512(kj + 32 * i));
      }
      v[kSlot[j]] = acc;
    }
    _mm512_mask_storeu_ps(s + c, static_cast<__mmask16>((1u << n) - 1u),
                          _mm512_mul_ps(vscale, Reduce16(v)));
  }
}

// Whether Scores16Bf16 serves this problem (bf16 pools, head_dim 64, 128 or 256).
inline bool DirectBf16Scores(const Problem& p) {
  return p.bf16 && p.kv_kind == KvKind::kFloat &&
         (p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256);
}

inline void ScoresBf16(const uint16_t* q, const uint16_t* keys, int head_dim, int a, int b,
                       float scale, float* s) {
  switch (head_dim) {
    case 64: return Scores16Bf16<2>(q, keys, a, b, scale, s);
    case 128: return Scores16Bf16<4>(q, keys, a, b, scale, s);
    default: return Scores16Bf16<8>(q, keys, a, b, scale, s);
  }
}
#else
inline bool DirectBf16Scores(const Problem&) { return false; }
inline void ScoresBf16(const uint16_t*, const uint16_t*, int, int, int, float, float*) {}
#endif

// Scores of one query row against keys [j0, j1) of a page: s[j] = q . k[j].
inline void Scores(const float* q, const float* keys, int head_dim, int j0, int j1, float* s) {
#ifdef __AVX512F__
  switch (head_dim) {
    case 64: return Scores16<4>(q, keys, j0, j1, s);
    case 128: return Scores16<8>(q, keys, j0, j1, s);
    case 256: return Scores16<16>(q, keys, j0, j1, s);
    default: break;
  }
  if (head_dim % 16 == 0) {
    for (int j = j0; j < j1; ++j) {
      const float* kj = keys + static_cast<int64_t>(j) * head_dim;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kj));
      for (int h = 16; h < head_dim; h += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h), _mm512_loadu_ps(kj + h), acc);
      s[j] = _mm512_reduce_add_ps(acc);
    }
    return;
  }
#elif defined(JAXSERVE_ATTENTION_AVX2)
  if (head_dim % 8 == 0) return jaxserve_cpu::attention_avx2::Scores(q, keys, head_dim, j0, j1, s);
#endif
  for (int j = j0; j < j1; ++j) {
    const float* kj = keys + static_cast<int64_t>(j) * head_dim;
    float acc = 0.f;
    for (int h = 0; h < head_dim; ++h) acc += q[h] * kj[h];
    s[j] = acc;
  }
}

// acc = alpha * acc + sum_{j in [a, b)} p[j] * v[j]
inline void Accumulate(float* acc, float alpha, const float* p, const float* values,
                       int head_dim, int a, int b) {
#ifdef __AVX512F__
  if (head_dim % 16 == 0 && head_dim <= 128) {
    // Two accumulator sets (even and odd keys): twice the independent FMA chains.
    __m512 r[8], r2[8];
    const int nv = head_dim / 16;
    const __m512 va = _mm512_set1_ps(alpha);
    for (int i = 0; i < nv; ++i) {
      r[i] = _mm512_mul_ps(va, _mm512_loadu_ps(acc + 16 * i));
      r2[i] = _mm512_setzero_ps();
    }
    int j = a;
    for (; j + 1 < b; j += 2) {
      const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
      const float* v0 = values + static_cast<int64_t>(j) * head_dim;
      const float* v1 = v0 + head_dim;
      for (int i = 0; i < nv; ++i) {
        r[i] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * i), r[i]);
        r2[i] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1 + 16 * i), r2[i]);
      }
    }
    if (j < b) {
      const __m512 p0 = _mm512_set1_ps(p[j]);
      const float* v0 = values + static_cast<int64_t>(j) * head_dim;
      for (int i = 0; i < nv; ++i) r[i] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * i), r[i]);
    }
    for (int i = 0; i < nv; ++i) _mm512_storeu_ps(acc + 16 * i, _mm512_add_ps(r[i], r2[i]));
    return;
  }
  if (head_dim % 16 == 0 && head_dim <= 256) {
    __m512 r[16];
    const int nv = head_dim / 16;
    const __m512 va = _mm512_set1_ps(alpha);
    for (int i = 0; i < nv; ++i) r[i] = _mm512_mul_ps(va, _mm512_loadu_ps(acc + 16 * i));
    for (int j = a; j < b; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      const float* vj = values + static_cast<int64_t>(j) * head_dim;
      for (int i = 0; i < nv; ++i) r[i] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 16 * i), r[i]);
    }
    for (int i = 0; i < nv; ++i) _mm512_storeu_ps(acc + 16 * i, r[i]);
    return;
  }
#elif defined(JAXSERVE_ATTENTION_AVX2)
  if (head_dim % 8 == 0)
    return jaxserve_cpu::attention_avx2::Accumulate(acc, alpha, p, values, head_dim, a, b);
#endif
  for (int h = 0; h < head_dim; ++h) acc[h] *= alpha;
  for (int j = a; j < b; ++j) {
    const float* vj = values + static_cast<int64_t>(j) * head_dim;
    for (int h = 0; h < head_dim; ++h) acc[h] += p[j] * vj[h];
  }
}

// Per-worker buffers, sized once for the largest item.
struct Scratch {
  explicit Scratch(const Problem& p)
      : q(kMaxRows * p.head_dim), acc(kMaxRows * p.head_dim),
        k(p.kv_itemsize < 4 ? p.page_size * p.head_dim : 0),
        v(p.kv_itemsize < 4 ? p.page_size * p.head_dim : 0),
        s(kMaxRows * p.page_size), prob(kMaxRows * p.page_size) {}
  std::vector<float> q, acc, k, v, s, prob;
  float m[kMaxRows], l[kMaxRows];
  int lo[kMaxRows], hi[kMaxRows];  // row r sees context positions [lo, hi]
};

// Returns false when the item's metadata points outside the pools.
bool RunItem(const Problem& p, const Item& item, Scratch& w) {
  const int group = p.num_heads / p.num_kv_heads, hd = p.head_dim, S = p.page_size;
  const int rows = item.num_tokens * group;
  const int seq_len = p.seq_lens[item.seq];
  const int last = p.query_start_loc[item.seq + 1];
  int ctx_lo = seq_len, ctx_hi = -1;
  for (int t = 0; t < item.num_tokens; ++t) {
    const int token = item.first_token + t;
    const int pos = seq_len - (last - token);
    const int lo = p.sliding_window > 0 ? std::max(0, pos - p.sliding_window + 1) : 0;
    for (int g = 0; g < group; ++g) {
      const int r = t * group + g;
      w.lo[r] = lo;
      w.hi[r] = pos;
      w.m[r] = -INFINITY;
      w.l[r] = 0.f;
      const int head = item.kv_head * group + g;
      const int64_t offset = (static_cast<int64_t>(token) * p.num_heads + head) * hd;
      float* qr = w.q.data() + static_cast<int64_t>(r) * hd;
      if (p.bf16) {
        const uint16_t* in = static_cast<const uint16_t*>(p.q) + offset;
        for (int h = 0; h < hd; ++h) qr[h] = Bf16ToF32(in[h]) * p.sm_scale;
      } else {
        const float* in = static_cast<const float*>(p.q) + offset;
        for (int h = 0; h < hd; ++h) qr[h] = in[h] * p.sm_scale;
      }
    }
    ctx_lo = std::min(ctx_lo, lo);
    ctx_hi = std::max(ctx_hi, pos);
  }
  std::fill(w.acc.begin(), w.acc.begin() + static_cast<int64_t>(rows) * hd, 0.f);
  if (ctx_lo < 0 || ctx_hi >= p.pages_per_seq * S) return false;
  const int32_t* pages = p.page_indices + static_cast<int64_t>(item.seq) * p.pages_per_seq;
  for (int page_no = ctx_lo / S; page_no <= ctx_hi / S; ++page_no) {
    const int page = pages[page_no];
    if (page < 0 || page >= p.num_pages) return false;
    if (page_no < ctx_hi / S) {  // the next page is elsewhere in memory: fetch it early
      const int next = pages[page_no + 1];
      if (next >= 0 && next < p.num_pages) {
        const int64_t at = (static_cast<int64_t>(item.kv_head) * p.num_pages + next) * S * hd;
        const int64_t bytes = static_cast<int64_t>(S) * hd * p.kv_itemsize;
        for (int64_t line = 0; line < bytes; line += 64) {
          jaxserve_cpu::PrefetchL1(static_cast<const char*>(p.k) + at * p.kv_itemsize + line);
          jaxserve_cpu::PrefetchL1(static_cast<const char*>(p.v) + at * p.kv_itemsize + line);
        }
      }
    }
    const int base = page_no * S;
    const int j0 = std::max(ctx_lo - base, 0), j1 = std::min(ctx_hi - base + 1, S);
    const int64_t offset =
        ((static_cast<int64_t>(item.kv_head) * p.num_pages + page) * S + j0) * hd;
    // keys/values point at row 0 of the page (rows before j0 are never touched).
    const bool direct = DirectBf16Scores(p);  // bf16 keys are read as they are
    const float* keys = direct ? nullptr
        : AsFloat(p, p.k, p.k_scale, offset, j1 - j0, w.k.data()) -
          static_cast<int64_t>(j0) * hd;
    const uint16_t* raw_keys = static_cast<const uint16_t*>(p.k) + offset -
                               static_cast<int64_t>(j0) * hd;  // used when `direct`
    const float* values =
        AsFloat(p, p.v, p.v_scale, offset, j1 - j0, w.v.data()) - static_cast<int64_t>(j0) * hd;
    // Three passes over the rows (scores, softmax, values): each pass's rows are
    // independent, so the CPU overlaps their dependency chains.
    int ra[kMaxRows], rb[kMaxRows];
    float ralpha[kMaxRows];
    for (int r = 0; r < rows; ++r) {
      const int a = std::max(j0, w.lo[r] - base), b = std::min(j1, w.hi[r] - base + 1);
      ra[r] = a;
      rb[r] = b;
      if (a >= b) continue;
      float* s = w.s.data() + static_cast<int64_t>(r) * S;
      if (direct) {
        const int64_t q_at = (static_cast<int64_t>(item.first_token + r / group) * p.num_heads +
                              item.kv_head * group + r % group) * hd;
        ScoresBf16(static_cast<const uint16_t*>(p.q) + q_at, raw_keys, hd, a, b, p.sm_scale, s);
      } else {
        Scores(w.q.data() + static_cast<int64_t>(r) * hd, keys, hd, a, b, s);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int a = ra[r], b = rb[r];
      if (a >= b) continue;
      float* s = w.s.data() + static_cast<int64_t>(r) * S;
      float* prob = w.prob.data() + static_cast<int64_t>(r) * S;
      const int head = item.kv_head * group + r % group;
      if (p.soft_cap > 0.f)
        for (int j = a; j < b; ++j) s[j] = p.soft_cap * std::tanh(s[j] / p.soft_cap);
      if (p.alibi)
        for (int j = a; j < b; ++j) s[j] += p.alibi[head] * static_cast<float>(base + j - w.hi[r]);
      float row_max = -INFINITY;
      int jm = a;
#ifdef __AVX512F__
      for (; jm < b; jm += 16) {
        const __mmask16 mask = static_cast<__mmask16>((1u << std::min(16, b - jm)) - 1u);
        row_max = std::max(row_max, _mm512_mask_reduce_max_ps(mask, _mm512_maskz_loadu_ps(mask, s + jm)));
      }
#elif defined(JAXSERVE_ATTENTION_AVX2)
      row_max = jaxserve_cpu::attention_avx2::RowMax(s, a, b);
      jm = b;
#endif
      for (; jm < b; ++jm) row_max = std::max(row_max, s[jm]);
      const float m_new = std::max(w.m[r], row_max);
      const float alpha = std::exp(w.m[r] - m_new);  // 0 on the first page (m = -inf)
      float sum = 0.f;
      int j = a;
#ifdef __AVX512F__
      const __m512 vm = _mm512_set1_ps(m_new);
      __m512 vsum = _mm512_setzero_ps();
      for (; j + 16 <= b; j += 16) {
        __m512 e = Exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
        _mm512_storeu_ps(prob + j, e);
        vsum = _mm512_add_ps(vsum, e);
      }
      if (j < b) {
        const __mmask16 mask = static_cast<__mmask16>((1u << (b - j)) - 1u);
        __m512 e = Exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + j), vm));
        e = _mm512_maskz_mov_ps(mask, e);
        _mm512_mask_storeu_ps(prob + j, mask, e);
        vsum = _mm512_add_ps(vsum, e);
        j = b;
      }
      sum = _mm512_reduce_add_ps(vsum);
#elif defined(JAXSERVE_ATTENTION_AVX2)
      sum = jaxserve_cpu::attention_avx2::ExpSum(s, m_new, a, b, prob);
      j = b;
#endif
      for (; j < b; ++j) {
        prob[j] = std::exp(s[j] - m_new);
        sum += prob[j];
      }
      w.l[r] = alpha * w.l[r] + sum;
      w.m[r] = m_new;
      ralpha[r] = alpha;
    }
    for (int r = 0; r < rows; ++r) {
      if (ra[r] >= rb[r]) continue;
      Accumulate(w.acc.data() + static_cast<int64_t>(r) * hd, ralpha[r],
                 w.prob.data() + static_cast<int64_t>(r) * S, values, hd, ra[r], rb[r]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const int token = item.first_token + r / group, head = item.kv_head * group + r % group;
    const int64_t offset = (static_cast<int64_t>(token) * p.num_heads + head) * hd;
    const float* acc = w.acc.data() + static_cast<int64_t>(r) * hd;
    const float inv = w.l[r] > 0.f ? 1.f / w.l[r] : 0.f;
    if (p.bf16) {
      uint16_t* out = static_cast<uint16_t*>(p.out) + offset;
      for (int h = 0; h < hd; ++h) out[h] = F32ToBf16(acc[h] * inv);
    } else {
      float* out = static_cast<float*>(p.out) + offset;
      for (int h = 0; h < hd; ++h) out[h] = acc[h] * inv;
    }
  }
  return true;
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_pages,
                     ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> page_indices,
                     ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> query_start_loc,
                     ffi::Buffer<ffi::F32> alibi_slopes, ffi::Buffer<ffi::F16> k_scales,
                     ffi::Buffer<ffi::F16> v_scales, float sm_scale, int32_t sliding_window,
                     float soft_cap, ffi::Result<ffi::AnyBuffer> out) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), pd = page_indices.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || pd.size() != 2)
    return ffi::Error::InvalidArgument("expected q [T,N,H], pools [K,P,S,H], pages [B,W]");
  Problem p;
  p.num_tokens = static_cast<int>(qd[0]);
  p.num_heads = static_cast<int>(qd[1]);
  p.head_dim = static_cast<int>(qd[2]);
  p.num_kv_heads = static_cast<int>(kd[0]);
  p.num_pages = static_cast<int>(kd[1]);
  p.page_size = static_cast<int>(kd[2]);
  p.num_seqs = static_cast<int>(pd[0]);
  p.pages_per_seq = static_cast<int>(pd[1]);
  p.bf16 = q.element_type() == ffi::BF16;
  if (!p.bf16 && q.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("q must be float32 or bfloat16");
  const auto pool_type = k_pages.element_type();
  p.kv_kind = pool_type == ffi::F8E4M3FN ? KvKind::kF8E4M3
              : pool_type == ffi::S8     ? KvKind::kInt8
                                         : KvKind::kFloat;
  if (v_pages.element_type() != pool_type ||
      (p.kv_kind == KvKind::kFloat && pool_type != q.element_type()))
    return ffi::Error::InvalidArgument("pools must have q's dtype, or both be float8_e4m3fn "
                                       "or int8");
  p.kv_itemsize = p.kv_kind != KvKind::kFloat ? 1 : (p.bf16 ? 2 : 4);
  const int64_t num_rows = static_cast<int64_t>(p.num_kv_heads) * p.num_pages * p.page_size;
  const bool scaled = p.kv_kind != KvKind::kFloat;
  if (static_cast<int64_t>(k_scales.element_count()) != (scaled ? num_rows : 0) ||
      static_cast<int64_t>(v_scales.element_count()) != (scaled ? num_rows : 0))
    return ffi::Error::InvalidArgument("8-bit pools need [K, P, S] float16 scales (and only "
                                       "they)");
  p.k_scale = scaled ? k_scales.typed_data() : nullptr;
  p.v_scale = scaled ? v_scales.typed_data() : nullptr;
  const int group = p.num_heads / std::max(p.num_kv_heads, 1);
  if (p.num_kv_heads < 1 || p.num_heads % p.num_kv_heads || group > kMaxRows)
    return ffi::Error::InvalidArgument("q heads must be a multiple (<= 64x) of KV heads");
  p.q = q.untyped_data();
  p.k = k_pages.untyped_data();
  p.v = v_pages.untyped_data();
  p.page_indices = page_indices.typed_data();
  p.seq_lens = seq_lens.typed_data();
  p.query_start_loc = query_start_loc.typed_data();
  p.alibi = alibi_slopes.element_count() > 0 ? alibi_slopes.typed_data() : nullptr;
  if (p.alibi && static_cast<int>(alibi_slopes.element_count()) != p.num_heads)
    return ffi::Error::InvalidArgument("alibi_slopes must have one slope per q head");
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  p.sliding_window = sliding_window;
  p.out = out->untyped_data();

  const int* qsl = p.query_start_loc;
  if (qsl[0] < 0 || qsl[p.num_seqs] > p.num_tokens)
    return ffi::Error::InvalidArgument("query_start_loc out of range");
  const int tokens_per_item = std::max(1, kMaxRows / group);
  std::vector<Item> items;
  for (int b = 0; b < p.num_seqs; ++b) {
    const int n = qsl[b + 1] - qsl[b];
    if (n < 0 || n > p.seq_lens[b])
      return ffi::Error::InvalidArgument("a sequence has more queries than its length");
    for (int t = 0; t < n; t += tokens_per_item)
      for (int h = 0; h < p.num_kv_heads; ++h)
        items.push_back({b, h, qsl[b] + t, std::min(tokens_per_item, n - t)});
  }
  // Padding tokens (after the last sequence) get zero rows.
  const int64_t row = static_cast<int64_t>(p.num_heads) * p.head_dim * (p.bf16 ? 2 : 4);
  std::memset(static_cast<char*>(p.out) + qsl[p.num_seqs] * row, 0,
              (p.num_tokens - qsl[p.num_seqs]) * row);
  // Longest items first, so the last ones to finish are short.
  std::stable_sort(items.begin(), items.end(), [&](const Item& x, const Item& y) {
    return p.seq_lens[x.seq] > p.seq_lens[y.seq];
  });
  std::atomic<bool> ok{true};
  // One scratch per worker, made by the worker itself on its first item.
  std::vector<std::unique_ptr<Scratch>> scratch(NumWorkers(pool));
  auto body = [&](int64_t i, int worker) {
    auto& mine = scratch[worker];
    if (!mine) mine = std::make_unique<Scratch>(p);
    if (!RunItem(p, items[i], *mine)) ok.store(false);
  };
  ParallelFor(pool, static_cast<int64_t>(items.size()), body);
  if (!ok.load()) return ffi::Error::InvalidArgument("page_indices or seq_lens out of range");
  return ffi::Error::Success();
}

}  // namespace

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(ragged_paged_attention_cpu, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int32_t>("sliding_window")
                                  .Attr<float>("soft_cap")
                                  .Ret<ffi::AnyBuffer>());
#pragma GCC visibility pop
