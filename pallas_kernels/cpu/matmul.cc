// y[M, N] = x[M, K] @ W as XLA CPU FFI handlers, float32 accumulation, on the FFI pool.
//
// Handlers (registered as "jaxserve_<symbol>"):
//   matmul_f32_kn          x f32 [M, K], W f32 [K, N] -> y f32 [M, N]
//   matmul_f32_nk          x f32 [M, K], W f32 [N, K] -> y f32 [M, N]   (y = x @ W^T)
//   matmul_bf16_kn         x bf16 [M, K], W bf16 [K, N] -> y bf16 [M, N]
//   matmul_bf16_nk         x bf16 [M, K], W bf16 [N, K] -> y bf16 [M, N]
//   matmul_bf16_kn_outf32  x bf16 [M, K], W bf16 [K, N] -> y f32 [M, N]  (the f32 sums)
//   matmul_bf16_nk_outf32  x bf16 [M, K], W bf16 [N, K] -> y f32 [M, N]
//   gated_mlp_f32          x f32 [M, K], Wg f32 [K, N], Wu f32 [K, N] -> y f32 [M, N]
//   gated_mlp_bf16         x bf16 [M, K], Wg bf16 [K, N], Wu bf16 [K, N] -> y bf16 [M, N]
//   lm_head_argmax_f32     h f32 [M, K], E f32 [N, K] -> idx s32 [M]  (argmax of h @ E^T)
//     (each lm_head_argmax_* also takes rows and a packed id mask s32 [M, W], W = 0: none)
//   lm_head_argmax_bf16    h bf16 [M, K], E bf16 [N, K] -> idx s32 [M]
//   lm_head_argmax_kn_f32  h f32 [M, K], Et f32 [K, N] -> idx s32 [M]  (argmax of h @ Et)
//   lm_head_argmax_kn_bf16 h bf16 [M, K], Et bf16 [K, N] -> idx s32 [M]
// Every handler takes one more operand after the listed ones, rows s32 [1]: only the first
// min(max(rows[0], 0), M) rows of x are computed (the step's real tokens; the rest is
// bucket padding); the rows of y (idx) past them are zeros.
// bf16 products are exact in f32 and summed in f32; y is rounded to nearest even once.
// gated_mlp: y = silu(x @ Wg) * (x @ Wu), silu(g) = g / (1 + exp(-g)).
//
// This file binds the handlers; the kernels are in headers, one job each:
//   threading.h           ParallelFor: work items on the caller and XLA's intra-op pool
//   matmul_common.h       the code paths, the prefetch plan, row chunks
//   matmul_scalar.h       the portable loops
//   matmul_avx2.h         the AVX2 + FMA path
//   matmul_avx512.h       the AVX-512 float32 microkernels
//   matmul_avx512_bf16.h  the AVX-512 BF16 microkernels
//   matmul_blocks.h       one block of a product on the target's path
//   matmul_pack.h         packed panels of W, and where packing pays
//   matmul_gemm.h         matmul_*: (column panel x row chunk) work items
//   matmul_gated.h        gated_mlp_*
//   matmul_argmax.h       lm_head_argmax_*
// The matmul_*.h headers are parts of this translation unit only. Their code sits in an
// unnamed namespace (internal linkage, as when it was all in this file): in a named one,
// GCC inlines the drivers and microkernels differently.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "xla/ffi/api/ffi.h"
#include "matmul_argmax.h"
#include "matmul_gated.h"
#include "matmul_gemm.h"

namespace ffi = xla::ffi;
using jaxserve_cpu::matmul::RunGated;
using jaxserve_cpu::matmul::RunKN;
using jaxserve_cpu::matmul::RunLmHeadArgmax;
using jaxserve_cpu::matmul::RunNK;

namespace {

template <ffi::DataType DT>
using Elem = std::conditional_t<DT == ffi::DataType::F32, float, uint16_t>;
using RowsBuffer = ffi::Buffer<ffi::DataType::S32, 1>;

// How many leading rows of an [M, ...] operand to compute: rows[0] clamped to [0, M].
int64_t ValidRows(const RowsBuffer& rows, int64_t M) {
  if (rows.element_count() < 1) return M;
  return std::clamp<int64_t>(rows.typed_data()[0], 0, M);
}

// Zeroes rows [m0, M) of a row-major [M, N] result.
template <typename YT>
void ZeroRows(YT* y, int64_t m0, int64_t M, int64_t N) {
  if (m0 < M) std::memset(y + m0 * N, 0, sizeof(YT) * (M - m0) * N);
}

template <ffi::DataType DT, bool kNK, ffi::DataType YDT = DT>
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<DT, 2> x, ffi::Buffer<DT, 2> w,
                      RowsBuffer rows, ffi::ResultBuffer<YDT, 2> y) {
  using T = Elem<DT>;
  using YT = Elem<YDT>;
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  int64_t M = xd[0], K = xd[1];
  int64_t N = kNK ? wd[0] : wd[1];
  int64_t wk = kNK ? wd[1] : wd[0];
  if (wk != K || yd[0] != M || yd[1] != N)
    return ffi::Error::InvalidArgument("matmul: inconsistent shapes of x, w and y");
  if (M == 0 || N == 0) return ffi::Error::Success();
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  const T* wp = reinterpret_cast<const T*>(w.untyped_data());
  YT* yp = reinterpret_cast<YT*>(y->untyped_data());
  const int64_t valid = ValidRows(rows, M);
  ZeroRows(yp, valid, M, N);
  M = valid;
  if (M == 0) return ffi::Error::Success();
  if (kNK) {
    RunNK<T, YT>(pool, xp, wp, yp, M, K, N);
  } else {
    RunKN<T, YT>(pool, xp, wp, yp, M, K, N);
  }
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error GatedImpl(ffi::ThreadPool pool, ffi::Buffer<DT, 2> x, ffi::Buffer<DT, 2> wg,
                     ffi::Buffer<DT, 2> wu, RowsBuffer rows, ffi::ResultBuffer<DT, 2> y) {
  using T = Elem<DT>;
  auto xd = x.dimensions(), gd = wg.dimensions(), ud = wu.dimensions(), yd = y->dimensions();
  int64_t M = xd[0], K = xd[1], N = gd[1];
  if (gd[0] != K || ud[0] != K || ud[1] != N || yd[0] != M || yd[1] != N)
    return ffi::Error::InvalidArgument("gated_mlp: inconsistent shapes of x, w_gate, w_up, y");
  if (M == 0 || N == 0) return ffi::Error::Success();
  T* yp = reinterpret_cast<T*>(y->untyped_data());
  const int64_t valid = ValidRows(rows, M);
  ZeroRows(yp, valid, M, N);
  if (valid == 0) return ffi::Error::Success();
  RunGated<T>(pool, reinterpret_cast<const T*>(x.untyped_data()),
              reinterpret_cast<const T*>(wg.untyped_data()),
              reinterpret_cast<const T*>(wu.untyped_data()), yp, valid, K, N);
  return ffi::Error::Success();
}

template <ffi::DataType DT, bool kKN = false>
ffi::Error LmHeadArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<DT, 2> h, ffi::Buffer<DT, 2> e,
                            RowsBuffer rows, ffi::Buffer<ffi::DataType::S32, 2> mask,
                            ffi::ResultBuffer<ffi::DataType::S32, 1> idx) {
  using T = Elem<DT>;
  auto hd = h.dimensions(), ed = e.dimensions(), id = idx->dimensions();
  auto md = mask.dimensions();
  int64_t M = hd[0], K = hd[1], N = kKN ? ed[1] : ed[0];
  if ((kKN ? ed[0] : ed[1]) != K || id[0] != M)
    return ffi::Error::InvalidArgument("lm_head_argmax: inconsistent shapes of h, e and idx");
  if (N == 0 || N > std::numeric_limits<int32_t>::max())
    return ffi::Error::InvalidArgument("lm_head_argmax: the vocabulary must be 1 to 2^31 - 1");
  if (md[0] != M || (md[1] != 0 && md[1] < (N + 31) / 32))  // [M, 0]: no mask
    return ffi::Error::InvalidArgument("lm_head_argmax: the mask must be [M, 0] or [M, W] "
                                       "with W >= ceil(V / 32)");
  if (M == 0) return ffi::Error::Success();
  int32_t* out = reinterpret_cast<int32_t*>(idx->untyped_data());
  const int64_t valid = ValidRows(rows, M);
  ZeroRows(out, valid, M, 1);
  if (valid == 0) return ffi::Error::Success();
  RunLmHeadArgmax<T, kKN>(pool, reinterpret_cast<const T*>(h.untyped_data()),
                          reinterpret_cast<const T*>(e.untyped_data()), out, valid, K, N,
                          md[1] ? reinterpret_cast<const int32_t*>(mask.untyped_data())
                                : nullptr,
                          md[1]);
  return ffi::Error::Success();
}

}  // namespace

using F32Buffer = ffi::Buffer<ffi::DataType::F32, 2>;
using Bf16Buffer = ffi::Buffer<ffi::DataType::BF16, 2>;
using S32Vector = ffi::Buffer<ffi::DataType::S32, 1>;
using S32Matrix = ffi::Buffer<ffi::DataType::S32, 2>;
constexpr auto kF32KN = MatmulImpl<ffi::DataType::F32, false>;
constexpr auto kF32NK = MatmulImpl<ffi::DataType::F32, true>;
constexpr auto kBf16KN = MatmulImpl<ffi::DataType::BF16, false>;
constexpr auto kBf16NK = MatmulImpl<ffi::DataType::BF16, true>;
constexpr auto kBf16KNOutF32 = MatmulImpl<ffi::DataType::BF16, false, ffi::DataType::F32>;
constexpr auto kBf16NKOutF32 = MatmulImpl<ffi::DataType::BF16, true, ffi::DataType::F32>;
constexpr auto kGatedF32 = GatedImpl<ffi::DataType::F32>;
constexpr auto kGatedBf16 = GatedImpl<ffi::DataType::BF16>;
constexpr auto kArgmaxF32 = LmHeadArgmaxImpl<ffi::DataType::F32>;
constexpr auto kArgmaxBf16 = LmHeadArgmaxImpl<ffi::DataType::BF16>;
constexpr auto kArgmaxKNF32 = LmHeadArgmaxImpl<ffi::DataType::F32, true>;
constexpr auto kArgmaxKNBf16 = LmHeadArgmaxImpl<ffi::DataType::BF16, true>;

#define JAXSERVE_MATMUL_HANDLER(symbol, impl, buffer, out_buffer)              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                 \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<buffer>()                            \
                                    .Arg<buffer>()                            \
                                    .Arg<RowsBuffer>()                        \
                                    .Ret<out_buffer>());
#define JAXSERVE_GATED_HANDLER(symbol, impl, buffer)                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                 \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<buffer>()                            \
                                    .Arg<buffer>()                            \
                                    .Arg<buffer>()                            \
                                    .Arg<RowsBuffer>()                        \
                                    .Ret<buffer>());
#define JAXSERVE_ARGMAX_HANDLER(symbol, impl, buffer)                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                                 \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<buffer>()                            \
                                    .Arg<buffer>()                            \
                                    .Arg<RowsBuffer>()                        \
                                    .Arg<S32Matrix>()                         \
                                    .Ret<S32Vector>());

#pragma GCC visibility push(default)
JAXSERVE_MATMUL_HANDLER(matmul_f32_kn, kF32KN, F32Buffer, F32Buffer)
JAXSERVE_MATMUL_HANDLER(matmul_f32_nk, kF32NK, F32Buffer, F32Buffer)
JAXSERVE_MATMUL_HANDLER(matmul_bf16_kn, kBf16KN, Bf16Buffer, Bf16Buffer)
JAXSERVE_MATMUL_HANDLER(matmul_bf16_nk, kBf16NK, Bf16Buffer, Bf16Buffer)
JAXSERVE_MATMUL_HANDLER(matmul_bf16_kn_outf32, kBf16KNOutF32, Bf16Buffer, F32Buffer)
JAXSERVE_MATMUL_HANDLER(matmul_bf16_nk_outf32, kBf16NKOutF32, Bf16Buffer, F32Buffer)
JAXSERVE_GATED_HANDLER(gated_mlp_f32, kGatedF32, F32Buffer)
JAXSERVE_GATED_HANDLER(gated_mlp_bf16, kGatedBf16, Bf16Buffer)
JAXSERVE_ARGMAX_HANDLER(lm_head_argmax_f32, kArgmaxF32, F32Buffer)
JAXSERVE_ARGMAX_HANDLER(lm_head_argmax_bf16, kArgmaxBf16, Bf16Buffer)
JAXSERVE_ARGMAX_HANDLER(lm_head_argmax_kn_f32, kArgmaxKNF32, F32Buffer)
JAXSERVE_ARGMAX_HANDLER(lm_head_argmax_kn_bf16, kArgmaxKNBf16, Bf16Buffer)
#pragma GCC visibility pop
