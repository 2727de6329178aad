// y[M, N] = x[M, K] @ W with W quantized along K, as XLA CPU FFI handlers, float32 out.
//
// W is integers q plus, per group of g rows of K and per column, a scale and optionally a
// min (float32, or float16 as GGUF stores them: both of one type): w = q * scale + min, or
// w = (q - zero) * scale (zero: 0 for int8, 8 for int4). Handlers (registered as
// "jaxserve_<symbol>"), each with rows s32 [1] last (sc: f32 or f16):
//   qmatmul_i8      x f32 [M, K], q s8 [K, N], scales sc [G, N]               -> y f32 [M, N]
//   qmatmul_i8_min  x f32 [M, K], q s8 [K, N], scales, mins sc [G, N]         -> y f32 [M, N]
//   qmatmul_i4      x f32 [M, K], q u8 [K/2, N], scales sc [G, N]             -> y f32 [M, N]
//   qmatmul_i4_min  x f32 [M, K], q u8 [K/2, N], scales, mins sc [G, N]       -> y f32 [M, N]
//   qmatmul_argmax_{i8,i8_min,i4,i4_min}: the same operands -> idx s32 [M], the argmax of
//                   each row of y (a greedy LM head; jnp.argmax's rule: the first NaN, else
//                   the first of the largest)
// int4 byte (i, n) holds q[2i, n] in its low nibble and q[2i + 1, n] in its high one.
// Only the first min(max(rows[0], 0), M) rows are computed; the rest of y is zeros (of
// idx: 0).
//
// The weights are dequantized in the micro-kernel: q converted to float32 in registers,
// x * q accumulated per group, then acc * scale (+ the group's sum of x times min) added
// into y. One row of x (decoding one sequence) runs the GEMV kernel (qmatmul_gemv.h: 32
// columns a call, AVX2 + FMA); more rows the panel kernels (qmatmul_panel.h: 16 columns,
// AVX-512 or AVX2 + FMA); portable loops (qmatmul_common.h) run the rest and the column
// tails.

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "qmatmul_common.h"
#include "qmatmul_gemv.h"
#include "qmatmul_panel.h"
#include "threading.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using RowsBuffer = ffi::Buffer<ffi::DataType::S32, 1>;
using F32Matrix = ffi::Buffer<ffi::DataType::F32, 2>;
using jaxserve_cpu::qmatmul::Problem;

// One work item of the panel kernels: a 16-column panel (or the last, narrower one) over
// every row.
template <bool kInt4, bool kMin, typename S>
void Item(const Problem<S>& p, const float* xsum, int64_t panel) {
  using namespace jaxserve_cpu::qmatmul;
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

// y = x @ W for the p.M rows of p: one row by the GEMV kernel, more by the panel kernels.
template <bool kInt4, bool kMin, typename S>
void Compute(ffi::ThreadPool& pool, const Problem<S>& p) {
  using namespace jaxserve_cpu::qmatmul;
  const std::vector<float> xsum = kMin ? GroupSums(p) : std::vector<float>();
  const float* sums = xsum.data();
#ifdef JAXSERVE_QMATMUL_GEMV
  if (p.M == 1 && p.g % 2 == 0) {
    // chunks of columns (GemvChunk), the last N % 32 columns by the loops
    const int64_t blocks_end = p.N / 32 * 32;
    const int64_t chunk = GemvChunk(p.K, p.N, jaxserve_cpu::NumWorkers(pool));
    jaxserve_cpu::ParallelFor(pool, (p.N + chunk - 1) / chunk, [&](int64_t item) {
      const int64_t n0 = item * chunk, n1 = std::min(n0 + chunk, p.N);
      const int64_t simd_end = std::min(n1, blocks_end);
      if (simd_end > n0) GemvColumns<kInt4, kMin>(p, sums, n0, simd_end);
      if (n1 > simd_end) BlockScalar<kInt4, kMin>(p, sums, 0, 1, std::max(n0, simd_end), n1);
    });
    return;
  }
#endif
  jaxserve_cpu::ParallelFor(pool, (p.N + kPanel - 1) / kPanel,
                            [&p, sums](int64_t panel) { Item<kInt4, kMin>(p, sums, panel); });
}

// The first index of the row's NaN if it has one, else of its largest value (jnp.argmax).
int32_t RowArgmax(const float* row, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (row[i] != row[i]) return static_cast<int32_t>(i);
    if (row[i] > row[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

// The operands of one call: x, q, scales and mins (nullptr: symmetric) as they came.
template <ffi::DataType QDT>
struct Operands {
  F32Matrix x;
  ffi::Buffer<QDT, 2> q;
  ffi::AnyBuffer scales;
  const ffi::AnyBuffer* mins;
};

// Checks the operands; the valid row count, or -1 when the shapes or types do not fit.
template <bool kInt4, ffi::DataType QDT>
int64_t ValidRows(const Operands<QDT>& o, RowsBuffer& rows) {
  auto xd = o.x.dimensions(), qd = o.q.dimensions(), sd = o.scales.dimensions();
  const auto type = o.scales.element_type();
  if (sd.size() != 2 || (type != ffi::DataType::F32 && type != ffi::DataType::F16)) return -1;
  const int64_t M = xd[0], K = xd[1], N = qd[1], G = sd[0];
  if ((kInt4 ? 2 * qd[0] : qd[0]) != K || sd[1] != N || G < 1 || K % G != 0 ||
      (kInt4 && (K / G) % 2))
    return -1;
  if (o.mins != nullptr) {
    auto md = o.mins->dimensions();
    if (md.size() != 2 || md[0] != G || md[1] != N || o.mins->element_type() != type)
      return -1;
  }
  return rows.element_count() < 1 ? M : std::clamp<int64_t>(rows.typed_data()[0], 0, M);
}

// y = x @ W for the first `valid` rows of x into `out` [valid, N], with the scales' type.
template <bool kInt4, bool kMin, ffi::DataType QDT>
void Run(ffi::ThreadPool& pool, const Operands<QDT>& o, int64_t valid, float* out) {
  const int64_t K = o.x.dimensions()[1], N = o.q.dimensions()[1];
  const int64_t G = o.scales.dimensions()[0];
  const auto* q = reinterpret_cast<const uint8_t*>(o.q.untyped_data());
  if (o.scales.element_type() == ffi::DataType::F16) {
    using S = uint16_t;
    const S* mins = kMin ? static_cast<const S*>(o.mins->untyped_data()) : nullptr;
    Compute<kInt4, kMin>(pool, Problem<S>{o.x.typed_data(), q, static_cast<const S*>(
        o.scales.untyped_data()), mins, out, valid, K, N, G, K / G});
  } else {
    const float* mins = kMin ? static_cast<const float*>(o.mins->untyped_data()) : nullptr;
    Compute<kInt4, kMin>(pool, Problem<float>{o.x.typed_data(), q, static_cast<const float*>(
        o.scales.untyped_data()), mins, out, valid, K, N, G, K / G});
  }
}

template <bool kInt4, bool kMin, ffi::DataType QDT>
ffi::Error QMatmulImpl(ffi::ThreadPool pool, const Operands<QDT>& o, RowsBuffer rows,
                       ffi::ResultBuffer<ffi::DataType::F32, 2> y) {
  const int64_t valid = ValidRows<kInt4>(o, rows);
  const int64_t M = o.x.dimensions()[0], N = o.q.dimensions()[1];
  if (valid < 0 || y->dimensions()[0] != M || y->dimensions()[1] != N)
    return ffi::Error::InvalidArgument(
        "qmatmul: inconsistent shapes or types of x, q, scales (mins) and y");
  float* yp = y->typed_data();
  if (valid < M) std::memset(yp + valid * N, 0, sizeof(float) * (M - valid) * N);
  if (valid == 0 || N == 0) return ffi::Error::Success();
  Run<kInt4, kMin>(pool, o, valid, yp);
  return ffi::Error::Success();
}

// argmax(x @ W) per row (a greedy LM head): the rows' logits in a scratch buffer, then
// their argmax; rows past `rows` get 0.
template <bool kInt4, bool kMin, ffi::DataType QDT>
ffi::Error ArgmaxImpl(ffi::ThreadPool pool, const Operands<QDT>& o, RowsBuffer rows,
                      ffi::ResultBuffer<ffi::DataType::S32, 1> idx) {
  const int64_t valid = ValidRows<kInt4>(o, rows);
  const int64_t M = o.x.dimensions()[0], N = o.q.dimensions()[1];
  if (valid < 0 || idx->dimensions()[0] != M)
    return ffi::Error::InvalidArgument(
        "qmatmul_argmax: inconsistent shapes or types of x, q, scales (mins) and idx");
  if (N < 1 || N > std::numeric_limits<int32_t>::max())
    return ffi::Error::InvalidArgument("qmatmul_argmax: N must be 1 to 2^31 - 1");
  int32_t* out = idx->typed_data();
  std::fill(out, out + M, 0);
  if (valid == 0) return ffi::Error::Success();
  std::vector<float> logits(valid * N);
  Run<kInt4, kMin>(pool, o, valid, logits.data());
  for (int64_t m = 0; m < valid; ++m) out[m] = RowArgmax(logits.data() + m * N, N);
  return ffi::Error::Success();
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error Symmetric(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q,
                     ffi::AnyBuffer s, RowsBuffer rows,
                     ffi::ResultBuffer<ffi::DataType::F32, 2> y) {
  return QMatmulImpl<kInt4, false>(pool, Operands<QDT>{x, q, s, nullptr}, rows, y);
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error WithMin(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q, ffi::AnyBuffer s,
                   ffi::AnyBuffer mins, RowsBuffer rows,
                   ffi::ResultBuffer<ffi::DataType::F32, 2> y) {
  return QMatmulImpl<kInt4, true>(pool, Operands<QDT>{x, q, s, &mins}, rows, y);
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error SymmetricArgmax(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q,
                           ffi::AnyBuffer s, RowsBuffer rows,
                           ffi::ResultBuffer<ffi::DataType::S32, 1> idx) {
  return ArgmaxImpl<kInt4, false>(pool, Operands<QDT>{x, q, s, nullptr}, rows, idx);
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error WithMinArgmax(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q,
                         ffi::AnyBuffer s, ffi::AnyBuffer mins, RowsBuffer rows,
                         ffi::ResultBuffer<ffi::DataType::S32, 1> idx) {
  return ArgmaxImpl<kInt4, true>(pool, Operands<QDT>{x, q, s, &mins}, rows, idx);
}

}  // namespace

using S8Matrix = ffi::Buffer<ffi::DataType::S8, 2>;
using U8Matrix = ffi::Buffer<ffi::DataType::U8, 2>;
using S32Vector = ffi::Buffer<ffi::DataType::S32, 1>;
constexpr auto kI8 = Symmetric<false, ffi::DataType::S8>;
constexpr auto kI4 = Symmetric<true, ffi::DataType::U8>;
constexpr auto kI8Min = WithMin<false, ffi::DataType::S8>;
constexpr auto kI4Min = WithMin<true, ffi::DataType::U8>;
constexpr auto kArgmaxI8 = SymmetricArgmax<false, ffi::DataType::S8>;
constexpr auto kArgmaxI4 = SymmetricArgmax<true, ffi::DataType::U8>;
constexpr auto kArgmaxI8Min = WithMinArgmax<false, ffi::DataType::S8>;
constexpr auto kArgmaxI4Min = WithMinArgmax<true, ffi::DataType::U8>;

#define JAXSERVE_QMATMUL_HANDLER(symbol, impl, qbuffer, out)                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                     \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<qbuffer>()                               \
                                    .Arg<ffi::AnyBuffer>()                        \
                                    .Arg<RowsBuffer>()                            \
                                    .Ret<out>());
#define JAXSERVE_QMATMUL_MIN_HANDLER(symbol, impl, qbuffer, out)                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                     \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<qbuffer>()                               \
                                    .Arg<ffi::AnyBuffer>()                        \
                                    .Arg<ffi::AnyBuffer>()                        \
                                    .Arg<RowsBuffer>()                            \
                                    .Ret<out>());

#pragma GCC visibility push(default)
JAXSERVE_QMATMUL_HANDLER(qmatmul_i8, kI8, S8Matrix, F32Matrix)
JAXSERVE_QMATMUL_HANDLER(qmatmul_i4, kI4, U8Matrix, F32Matrix)
JAXSERVE_QMATMUL_MIN_HANDLER(qmatmul_i8_min, kI8Min, S8Matrix, F32Matrix)
JAXSERVE_QMATMUL_MIN_HANDLER(qmatmul_i4_min, kI4Min, U8Matrix, F32Matrix)
JAXSERVE_QMATMUL_HANDLER(qmatmul_argmax_i8, kArgmaxI8, S8Matrix, S32Vector)
JAXSERVE_QMATMUL_HANDLER(qmatmul_argmax_i4, kArgmaxI4, U8Matrix, S32Vector)
JAXSERVE_QMATMUL_MIN_HANDLER(qmatmul_argmax_i8_min, kArgmaxI8Min, S8Matrix, S32Vector)
JAXSERVE_QMATMUL_MIN_HANDLER(qmatmul_argmax_i4_min, kArgmaxI4Min, U8Matrix, S32Vector)
#pragma GCC visibility pop
