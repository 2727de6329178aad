"""Rotary embedding on CPU (rope.cc): the rotate-half rotation as vectorized C++ loops.

XLA:CPU evaluates the same math as a concatenation fusion one element at a time (3-4 ms of a
512-token bf16 prefill step on the 40M model); the caller passes the [T, H/2] cos/sin tables.
`available()` says whether it builds here.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.cpu import build

_TARGETS = ("rope_cpu",)


def available(march: str | None = None) -> bool:
    """Whether rope.cc builds and registers with XLA here for `march` (see
    `build.resolve_march`)."""
    return build.available("rope", _TARGETS, march)


def rope(x,    # [T, n, H] float32 or bfloat16
         cos,  # [T, H/2] float32
         sin,  # [T, H/2] float32
         *, march: str | None = None) -> jax.Array:  # [T, n, H] in x's dtype
    """(x1 * cos - x2 * sin, x2 * cos + x1 * sin) on the halves of every head, in float32."""
    if x.ndim != 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be [T, n, H] with an even H, got shape {x.shape}")
    table = (x.shape[0], x.shape[-1] // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != table:
            raise ValueError(f"{name} shape {t.shape} != {table} ([T, H/2])")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"x dtype {x.dtype} is not float32 or bfloat16")
    call = jax.ffi.ffi_call(build.ffi_target("rope", _TARGETS, "rope_cpu", march),
                            jax.ShapeDtypeStruct(x.shape, x.dtype))
    return call(x, cos.astype(jnp.float32), sin.astype(jnp.float32))
