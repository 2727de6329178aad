"""A native CPU GEMM over quantized weights (qmatmul.cc): y = x @ W, W dequantized in the
micro-kernel, so the weights stream from memory as 8 or 4 bits.

W [K, N] is q (int8 [K, N], or int4 packed two rows to a byte, uint8 [K/2, N]: row 2i in
the low nibble) with per-group `scales` [G, N] and optional `mins` [G, N] (float32, or
float16 as GGUF stores them, widened exactly in the kernel; both of one type), g = K / G
rows of K per group: w = q * scale + min, or (q - zero) * scale, zero 0 (int8) or 8
(int4). x is float32 and so is y. `rows`: only the first `rows` rows of the flattened x
are computed, the rest of y is zeros (None: all). `qmatmul_argmax` is the argmax of each
row of that product (a greedy LM head over a quantized [D, V] head); `qmatmul_gated` is a
gated MLP's silu(x @ W_gate) * (x @ W_up) in one call. `available()` says whether it
builds.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.cpu import build

_TARGETS = ("qmatmul_i8", "qmatmul_i8_min", "qmatmul_i4", "qmatmul_i4_min",
            "qmatmul_argmax_i8", "qmatmul_argmax_i8_min", "qmatmul_argmax_i4",
            "qmatmul_argmax_i4_min", "qmatmul_gated_i8", "qmatmul_gated_i8_min",
            "qmatmul_gated_i4", "qmatmul_gated_i4_min")


def available(march: str | None = None) -> bool:
    """Whether qmatmul.cc builds and registers with XLA here for `march` (see
    `build.resolve_march`)."""
    return build.available("qmatmul", _TARGETS, march)


def qmatmul(x: jax.Array,  # [..., K] float32
            q: jax.Array,  # int8 [K, N] (bits 8) or uint8 [K/2, N] (bits 4)
            scales: jax.Array,  # [G, N] float32 or float16
            mins: jax.Array | None = None,  # [G, N] scales' dtype, or None (symmetric)
            *, bits: int, group_size: int, rows=None,
            march: str | None = None) -> jax.Array:  # [..., N] float32
    """x @ dequantize(q, scales, mins), accumulated in float32 per group."""
    m, n, operands = _operands(x, q, scales, mins, bits, group_size, rows)
    symbol = f"qmatmul_i{bits}" + ("" if mins is None else "_min")
    y = jax.ffi.ffi_call(build.ffi_target("qmatmul", _TARGETS, symbol, march),
                         jax.ShapeDtypeStruct((m, n), jnp.float32))(*operands)
    return y.reshape(*x.shape[:-1], n)


def qmatmul_argmax(x: jax.Array,  # [..., K] float32
                   q: jax.Array,  # int8 [K, N] (bits 8) or uint8 [K/2, N] (bits 4)
                   scales: jax.Array,  # [G, N] float32 or float16
                   mins: jax.Array | None = None,  # [G, N] scales' dtype, or None (symmetric)
                   *, bits: int, group_size: int, rows=None,
                   march: str | None = None) -> jax.Array:  # [...] int32
    """argmax(qmatmul(x, ...), axis=-1) with jnp.argmax's rule (the first NaN, else the first
    of the largest); rows past `rows` get 0. The logits stay inside the call."""
    m, n, operands = _operands(x, q, scales, mins, bits, group_size, rows)
    if n >= 2**31:
        raise ValueError(f"N must be below 2^31 for int32 indices, got {n}")
    symbol = f"qmatmul_argmax_i{bits}" + ("" if mins is None else "_min")
    idx = jax.ffi.ffi_call(build.ffi_target("qmatmul", _TARGETS, symbol, march),
                           jax.ShapeDtypeStruct((m,), jnp.int32))(*operands)
    return idx.reshape(x.shape[:-1])


def qmatmul_gated(x: jax.Array,  # [..., K] float32
                  gate: tuple,  # (q, scales, mins) of W_gate [K, N], as qmatmul takes them
                  up: tuple,  # (q, scales, mins) of W_up: gate's form, shape and dtypes
                  *, bits: int, group_size: int, rows=None,
                  march: str | None = None) -> jax.Array:  # [..., N] float32
    """silu(x @ W_gate) * (x @ W_up) in one call (silu(g) = g / (1 + exp(-g)), float32):
    each thread computes the same columns of both products, then their epilogue."""
    m, n, operands = _operands(x, *gate, bits, group_size, rows)
    _, _, up_operands = _operands(x, *up, bits, group_size, rows)
    if (up[0].shape, up[1].dtype, up[2] is None) != (gate[0].shape, gate[1].dtype,
                                                    gate[2] is None):
        raise ValueError("gate and up must have one form: q shape, scales dtype, mins or not")
    symbol = f"qmatmul_gated_i{bits}" + ("" if gate[2] is None else "_min")
    y = jax.ffi.ffi_call(build.ffi_target("qmatmul", _TARGETS, symbol, march),
                         jax.ShapeDtypeStruct((m, n), jnp.float32))(
        *operands[:-1], *up_operands[1:])
    return y.reshape(*x.shape[:-1], n)


def _operands(x, q, scales, mins, bits: int, group_size: int, rows):
    """(M, N, the kernel's operands) after checking them: x flattened to [M, K], rows [1]."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if jnp.dtype(x.dtype) != jnp.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    want = jnp.dtype(jnp.int8 if bits == 8 else jnp.uint8)
    if q.ndim != 2 or jnp.dtype(q.dtype) != want:
        raise ValueError(f"q must be 2-D {want} for bits={bits}, got {q.dtype} {q.shape}")
    k = x.shape[-1]
    n = q.shape[1]
    if q.shape[0] * (8 // bits) != k:
        raise ValueError(f"q of shape {q.shape} (bits={bits}) does not match K={k}")
    if k % group_size or (bits == 4 and group_size % 2):
        raise ValueError(f"group_size {group_size} does not divide K={k} into even groups")
    groups = (k // group_size, n)
    scale_dtype = jnp.dtype(scales.dtype)
    if scale_dtype not in (jnp.float32, jnp.float16):
        raise ValueError(f"scales must be float32 or float16, got {scale_dtype}")
    for name, t in (("scales", scales), ("mins", mins)):
        if t is not None and (t.shape != groups or jnp.dtype(t.dtype) != scale_dtype):
            raise ValueError(f"{name} must be {scale_dtype} {groups}, got {t.dtype} {t.shape}")
    m = 1
    for d in x.shape[:-1]:
        m *= d
    operands = [x.reshape(m, k), q, scales] + ([] if mins is None else [mins])
    if rows is None:
        rows = jnp.full((1,), m, jnp.int32)
    else:
        rows = jnp.asarray(rows).reshape(1).astype(jnp.int32)
    return m, n, operands + [rows]
