// Writes rows into a paged pool in place, as an XLA FFI handler: with the pool [..., L, S, W]
// viewed as [..., L*S, W], pool[..., slots[t], :] = rows[t, ..., :] (rows token-major, as
// the model makes them: no transposed copy is needed).
//
// The pool operand is aliased to the result, so with a donated pool nothing is copied.
// XLA:CPU has no bfloat16 scatter: its float normalization turns a bf16 scatter into a
// convert of the whole pool to float32 and back, which for a KV pool costs more than the
// rest of a decode step; this handler moves only the new rows, for any dtype.

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error SetRows(ffi::AnyBuffer pool, ffi::Buffer<ffi::S32> slots, ffi::AnyBuffer rows,
                   ffi::Result<ffi::AnyBuffer> out) {
  // pool [..., L, S, W] (slot = block * S + offset), rows [T, ..., W]
  const auto pd = pool.dimensions(), rd = rows.dimensions();
  if (rd.size() < 2 || pd.size() != rd.size() + 1)
    return ffi::Error::InvalidArgument("pool [..., L, S, W] and rows [T, ..., W] expected");
  if (rows.element_type() != pool.element_type())
    return ffi::Error::InvalidArgument("rows must have the pool's dtype");
  const size_t rank = pd.size();
  int64_t outer = 1;
  for (size_t i = 0; i + 3 < rank; ++i) {
    if (pd[i] != rd[i + 1]) return ffi::Error::InvalidArgument("rows' middle dims != the pool's");
    outer *= pd[i];
  }
  const int64_t num_slots = pd[rank - 3] * pd[rank - 2], width = pd[rank - 1];
  const int64_t num_rows = rd[0];
  if (rd[rank - 2] != width) return ffi::Error::InvalidArgument("rows' width != the pool's");
  const int64_t row_bytes = width * static_cast<int64_t>(ffi::ByteWidth(pool.element_type()));
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != pool.untyped_data())  // not aliased (the pool was not donated): copy it first
    std::memcpy(dst, pool.untyped_data(), pool.size_bytes());
  const int32_t* slot = slots.typed_data();
  for (int64_t t = 0; t < num_rows; ++t)
    if (slot[t] < 0 || slot[t] >= num_slots)
      return ffi::Error::InvalidArgument("a slot is outside the pool");
  const char* src = static_cast<const char*>(rows.untyped_data());
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t t = 0; t < num_rows; ++t)
      std::memcpy(dst + (o * num_slots + slot[t]) * row_bytes,
                  src + (t * outer + o) * row_bytes, row_bytes);
  return ffi::Error::Success();
}

}  // namespace

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(set_rows_cpu, SetRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
#pragma GCC visibility pop
