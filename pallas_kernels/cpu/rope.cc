// Rotary position embedding (HF's rotate-half layout) for XLA:CPU, as an XLA FFI handler.
//
// out[t, n, i] = x1 * cos[t, i] - x2 * sin[t, i], out[t, n, i + H/2] = x2 * cos + x1 * sin,
// with x1 = x[t, n, i], x2 = x[t, n, i + H/2], in float32, rounded once to x's dtype. XLA:CPU
// runs the same math as a concatenation fusion element by element (~1 ns per element); these
// loops vectorize. The [T, H/2] cos/sin tables come from the caller (computed once a step).

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Load(const void* base, int64_t i, bool bf16) {
  if (!bf16) return static_cast<const float*>(base)[i];
  uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline void Store(void* base, int64_t i, float f, bool bf16) {
  if (!bf16) {
    static_cast<float*>(base)[i] = f;
    return;
  }
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    bits = (bits >> 16) | 0x40;  // NaN stays NaN
  } else {
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // round to nearest even
  }
  static_cast<uint16_t*>(base)[i] = static_cast<uint16_t>(bits);
}

template <bool kBf16>
void Rotate(const void* x, const float* cos, const float* sin, void* out, int64_t tokens,
            int64_t heads, int64_t half) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t n = 0; n < heads; ++n) {
      const int64_t row = (t * heads + n) * 2 * half;
#pragma GCC ivdep
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = Load(x, row + i, kBf16), x2 = Load(x, row + half + i, kBf16);
        Store(out, row + i, x1 * c[i] - x2 * s[i], kBf16);
        Store(out, row + half + i, x2 * c[i] + x1 * s[i], kBf16);
      }
    }
  }
}

ffi::Error Rope(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                ffi::Result<ffi::AnyBuffer> out) {
  const auto xd = x.dimensions(), cd = cos.dimensions(), sd = sin.dimensions();
  if (xd.size() != 3 || cd.size() != 2 || sd.size() != 2 || xd[2] % 2 || cd[0] != xd[0] ||
      cd[1] * 2 != xd[2] || sd[0] != cd[0] || sd[1] != cd[1])
    return ffi::Error::InvalidArgument("expected x [T, n, H], cos and sin [T, H/2]");
  const bool bf16 = x.element_type() == ffi::BF16;
  if (!bf16 && x.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("x must be float32 or bfloat16");
  (bf16 ? Rotate<true> : Rotate<false>)(x.untyped_data(), cos.typed_data(), sin.typed_data(),
                                        out->untyped_data(), xd[0], xd[1], xd[2] / 2);
  return ffi::Error::Success();
}

}  // namespace

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(rope_cpu, Rope,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>());
#pragma GCC visibility pop
