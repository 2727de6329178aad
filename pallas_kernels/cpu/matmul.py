"""A native CPU GEMM, y = x @ W, as XLA FFI handlers (matmul.cc) for the small-M dots of decoding.

float32, or bfloat16 via AVX512_BF16 vdpbf16ps, with float32 accumulation; W is "kn" ([K, N],
a Linear kernel) or "nk" ([N, K], a tied LM head: logits = h @ E^T). `available()` says
whether the kernel builds here; callers fall back to jnp.dot when it does not.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.cpu import build

_TARGETS = ("matmul_f32_kn", "matmul_f32_nk", "matmul_bf16_kn", "matmul_bf16_nk")
_DTYPE_NAMES = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16"}


@functools.cache
def available() -> bool:
    """Whether matmul.cc builds and registers with XLA here."""
    return build.available("matmul", _TARGETS)


def matmul(x: jax.Array,  # [..., K]
           w: jax.Array,  # [K, N] ("kn") or [N, K] ("nk")
           *, w_layout: str = "kn") -> jax.Array:  # [..., N]
    """x @ w ("kn") or x @ w.T ("nk") with float32 accumulation, on the native CPU kernel.

    x and w must both be float32 or both bfloat16; the result has their dtype. Leading
    batch dims of x are flattened into M. Raises NativeKernelUnavailable if the kernel
    cannot be built here (check `available()` first).
    """
    if w_layout not in ("kn", "nk"):
        raise ValueError(f"w_layout must be 'kn' or 'nk', got {w_layout!r}")
    if x.ndim < 1:
        raise ValueError(f"x must have at least one dimension [..., K], got shape {x.shape}")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D ([K, N] or [N, K]), got shape {w.shape}")
    if jnp.dtype(x.dtype) not in _DTYPE_NAMES:
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")
    if jnp.dtype(w.dtype) != jnp.dtype(x.dtype):
        raise ValueError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    k = x.shape[-1]
    n, w_k = (w.shape[1], w.shape[0]) if w_layout == "kn" else w.shape
    if w_k != k:
        raise ValueError(f"w of shape {w.shape} (layout {w_layout!r}) does not match x's "
                         f"last dimension K={k}")
    batch = x.shape[:-1]
    m = 1
    for d in batch:
        m *= d
    target = f"matmul_{_DTYPE_NAMES[jnp.dtype(x.dtype)]}_{w_layout}"
    build.register("matmul", _TARGETS)
    x2 = x.reshape(m, k)  # [M, K]
    y = jax.ffi.ffi_call(f"jaxserve_{target}",
                         jax.ShapeDtypeStruct((m, n), x.dtype))(x2, w)  # [M, N]
    return y.reshape(*batch, n)
