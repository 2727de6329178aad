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
//   qmatmul_gated_{i8,i8_min,i4,i4_min}: x, then the gate's q, scales (, mins), then the
//                   up's, both of one form and shape -> y f32 [M, N] = silu(x @ W_gate) *
//                   (x @ W_up) (a gated MLP's up half, one call; silu(g) = g / (1 + e^-g))
// int4 byte (i, n) holds q[2i, n] in its low nibble and q[2i + 1, n] in its high one.
// Only the first min(max(rows[0], 0), M) rows are computed; the rest of y is zeros (of
// idx: 0).
//
// The weights are dequantized in the micro-kernel: q converted to float32 in registers,
// x * q accumulated per group, then acc * scale (+ the group's sum of x times min) added
// into y. One row of x (decoding one sequence) runs the GEMV kernel (qmatmul_gemv.h: 32
// columns a call, AVX2 + FMA); more rows the panel kernels (qmatmul_panel.h: 16 columns,
// AVX-512 or AVX2 + FMA); portable loops (qmatmul_common.h) run the rest and the column
// tails; qmatmul_compute.h splits the work over the threads.

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "qmatmul_common.h"
#include "qmatmul_compute.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using RowsBuffer = ffi::Buffer<ffi::DataType::S32, 1>;
using F32Matrix = ffi::Buffer<ffi::DataType::F32, 2>;
using jaxserve_cpu::qmatmul::Problem;

// The first index of the row's NaN if it has one, else of its largest value (jnp.argmax).
int32_t RowArgmax(const float* row, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (row[i] != row[i]) return static_cast<int32_t>(i);
    if (row[i] > row[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

// The operands of one weight: x, q, scales and mins (nullptr: symmetric) as they came.
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

// The Problem of the first `valid` rows of x, writing `out` [valid, N], with S the
// scales' type.
template <typename S, ffi::DataType QDT>
Problem<S> MakeProblem(const Operands<QDT>& o, int64_t valid, float* out) {
  const int64_t K = o.x.dimensions()[1], N = o.q.dimensions()[1];
  const int64_t G = o.scales.dimensions()[0];
  return Problem<S>{o.x.typed_data(), reinterpret_cast<const uint8_t*>(o.q.untyped_data()),
                    static_cast<const S*>(o.scales.untyped_data()),
                    o.mins ? static_cast<const S*>(o.mins->untyped_data()) : nullptr, out,
                    valid, K, N, G, K / G, N, 0};
}

// y = x @ W for the first `valid` rows of x into `out` [valid, N].
template <bool kInt4, bool kMin, ffi::DataType QDT>
void Run(ffi::ThreadPool& pool, const Operands<QDT>& o, int64_t valid, float* out) {
  using namespace jaxserve_cpu::qmatmul;
  if (o.scales.element_type() == ffi::DataType::F16) {
    Compute<kInt4, kMin>(pool, MakeProblem<uint16_t>(o, valid, out));
  } else {
    Compute<kInt4, kMin>(pool, MakeProblem<float>(o, valid, out));
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

// silu(x @ W_gate) * (x @ W_up): both weights of one form, shape and scale type.
template <bool kInt4, bool kMin, ffi::DataType QDT>
ffi::Error GatedImpl(ffi::ThreadPool pool, const Operands<QDT>& gate, const Operands<QDT>& up,
                     RowsBuffer rows, ffi::ResultBuffer<ffi::DataType::F32, 2> y) {
  using namespace jaxserve_cpu::qmatmul;
  const int64_t valid = ValidRows<kInt4>(gate, rows);
  const int64_t M = gate.x.dimensions()[0], N = gate.q.dimensions()[1];
  if (valid < 0 || ValidRows<kInt4>(up, rows) != valid || up.q.dimensions()[1] != N ||
      up.scales.dimensions()[0] != gate.scales.dimensions()[0] ||
      up.scales.element_type() != gate.scales.element_type() ||
      y->dimensions()[0] != M || y->dimensions()[1] != N)
    return ffi::Error::InvalidArgument(
        "qmatmul_gated: inconsistent shapes or types of x, the two weights and y");
  float* yp = y->typed_data();
  if (valid < M) std::memset(yp + valid * N, 0, sizeof(float) * (M - valid) * N);
  if (valid == 0 || N == 0) return ffi::Error::Success();
  if (gate.scales.element_type() == ffi::DataType::F16) {
    ComputeGated<kInt4, kMin>(pool, MakeProblem<uint16_t>(gate, valid, nullptr),
                              MakeProblem<uint16_t>(up, valid, nullptr), yp);
  } else {
    ComputeGated<kInt4, kMin>(pool, MakeProblem<float>(gate, valid, nullptr),
                              MakeProblem<float>(up, valid, nullptr), yp);
  }
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

using Any = ffi::AnyBuffer;
using F32Out = ffi::ResultBuffer<ffi::DataType::F32, 2>;
using S32Out = ffi::ResultBuffer<ffi::DataType::S32, 1>;

template <bool kInt4, ffi::DataType QDT>
ffi::Error Symmetric(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q, Any s,
                     RowsBuffer rows, F32Out y) {
  return QMatmulImpl<kInt4, false>(pool, Operands<QDT>{x, q, s, nullptr}, rows, y);
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error WithMin(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q, Any s, Any mins,
                   RowsBuffer rows, F32Out y) {
  return QMatmulImpl<kInt4, true>(pool, Operands<QDT>{x, q, s, &mins}, rows, y);
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error SymmetricArgmax(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q, Any s,
                           RowsBuffer rows, S32Out idx) {
  return ArgmaxImpl<kInt4, false>(pool, Operands<QDT>{x, q, s, nullptr}, rows, idx);
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error WithMinArgmax(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> q, Any s,
                         Any mins, RowsBuffer rows, S32Out idx) {
  return ArgmaxImpl<kInt4, true>(pool, Operands<QDT>{x, q, s, &mins}, rows, idx);
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error SymmetricGated(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> qg, Any sg,
                          ffi::Buffer<QDT, 2> qu, Any su, RowsBuffer rows, F32Out y) {
  return GatedImpl<kInt4, false>(pool, Operands<QDT>{x, qg, sg, nullptr},
                                 Operands<QDT>{x, qu, su, nullptr}, rows, y);
}

template <bool kInt4, ffi::DataType QDT>
ffi::Error WithMinGated(ffi::ThreadPool pool, F32Matrix x, ffi::Buffer<QDT, 2> qg, Any sg,
                        Any mg, ffi::Buffer<QDT, 2> qu, Any su, Any mu, RowsBuffer rows,
                        F32Out y) {
  return GatedImpl<kInt4, true>(pool, Operands<QDT>{x, qg, sg, &mg},
                                Operands<QDT>{x, qu, su, &mu}, rows, y);
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
constexpr auto kGatedI8 = SymmetricGated<false, ffi::DataType::S8>;
constexpr auto kGatedI4 = SymmetricGated<true, ffi::DataType::U8>;
constexpr auto kGatedI8Min = WithMinGated<false, ffi::DataType::S8>;
constexpr auto kGatedI4Min = WithMinGated<true, ffi::DataType::U8>;

#define JAXSERVE_QMATMUL_HANDLER(symbol, impl, qbuffer, out)                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                     \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<qbuffer>()                               \
                                    .Arg<Any>()                                   \
                                    .Arg<RowsBuffer>()                            \
                                    .Ret<out>());
#define JAXSERVE_QMATMUL_MIN_HANDLER(symbol, impl, qbuffer, out)                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                     \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<qbuffer>()                               \
                                    .Arg<Any>()                                   \
                                    .Arg<Any>()                                   \
                                    .Arg<RowsBuffer>()                            \
                                    .Ret<out>());
#define JAXSERVE_QMATMUL_GATED_HANDLER(symbol, impl, qbuffer)                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                     \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<qbuffer>()                               \
                                    .Arg<Any>()                                   \
                                    .Arg<qbuffer>()                               \
                                    .Arg<Any>()                                   \
                                    .Arg<RowsBuffer>()                            \
                                    .Ret<F32Matrix>());
#define JAXSERVE_QMATMUL_GATED_MIN_HANDLER(symbol, impl, qbuffer)                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                     \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<F32Matrix>()                             \
                                    .Arg<qbuffer>()                               \
                                    .Arg<Any>()                                   \
                                    .Arg<Any>()                                   \
                                    .Arg<qbuffer>()                               \
                                    .Arg<Any>()                                   \
                                    .Arg<Any>()                                   \
                                    .Arg<RowsBuffer>()                            \
                                    .Ret<F32Matrix>());

#pragma GCC visibility push(default)
JAXSERVE_QMATMUL_HANDLER(qmatmul_i8, kI8, S8Matrix, F32Matrix)
JAXSERVE_QMATMUL_HANDLER(qmatmul_i4, kI4, U8Matrix, F32Matrix)
JAXSERVE_QMATMUL_MIN_HANDLER(qmatmul_i8_min, kI8Min, S8Matrix, F32Matrix)
JAXSERVE_QMATMUL_MIN_HANDLER(qmatmul_i4_min, kI4Min, U8Matrix, F32Matrix)
JAXSERVE_QMATMUL_HANDLER(qmatmul_argmax_i8, kArgmaxI8, S8Matrix, S32Vector)
JAXSERVE_QMATMUL_HANDLER(qmatmul_argmax_i4, kArgmaxI4, U8Matrix, S32Vector)
JAXSERVE_QMATMUL_MIN_HANDLER(qmatmul_argmax_i8_min, kArgmaxI8Min, S8Matrix, S32Vector)
JAXSERVE_QMATMUL_MIN_HANDLER(qmatmul_argmax_i4_min, kArgmaxI4Min, U8Matrix, S32Vector)
JAXSERVE_QMATMUL_GATED_HANDLER(qmatmul_gated_i8, kGatedI8, S8Matrix)
JAXSERVE_QMATMUL_GATED_HANDLER(qmatmul_gated_i4, kGatedI4, U8Matrix)
JAXSERVE_QMATMUL_GATED_MIN_HANDLER(qmatmul_gated_i8_min, kGatedI8Min, S8Matrix)
JAXSERVE_QMATMUL_GATED_MIN_HANDLER(qmatmul_gated_i4_min, kGatedI4Min, U8Matrix)
#pragma GCC visibility pop
