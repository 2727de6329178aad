"""The quantized KV pool format: 8-bit keys and values with per-token, per-head scales.

A quantized layer keeps four pools: keys and values `[K, P, S, H]` in float8_e4m3fn or
int8, and their scales `[K, P, S, 1]` float32 (`scale_pool_shape`), laid out by the same
pages, so page tables, sharding over K and the null page carry over unchanged. Row
`(k, p, s)` holds `x / scale` rounded to the storage type, with `scale = absmax(x) / qmax`
over its H values (qmax 448 for e4m3, 127 for int8); it reads back as
`stored.astype(float32) * scale` (`dequantize`). An all-zero row has scale 0 and reads 0.
"""

import jax
import jax.numpy as jnp

# The largest finite magnitude of each storage type: an absmax row maps onto it.
_QMAX = {jnp.dtype(jnp.float8_e4m3fn): 448.0, jnp.dtype(jnp.int8): 127.0}
QUANTIZED_DTYPES = tuple(_QMAX)


def is_quantized(dtype) -> bool:
    """Whether a pool of `dtype` holds scaled 8-bit rows (and so comes with scales)."""
    return jnp.dtype(dtype) in _QMAX


def scale_pool_shape(num_kv_heads: int, num_pages: int, page_size: int) -> tuple[int, ...]:
    """Shape of one layer's key-scale pool (and value-scale pool): [K, P, S, 1] float32.
    The trailing 1 keeps the `[K, P, S, W]` pool layout, so the same row writer and
    sharding serve scales and values."""
    return (num_kv_heads, num_pages, page_size, 1)


def quantize(x,  # [..., H] rows in any float dtype
             dtype,  # the storage dtype: float8_e4m3fn or int8
             ) -> tuple[jax.Array, jax.Array]:  # ([..., H] dtype, [..., 1] float32 scales)
    """Each row scaled by its absmax onto the storage type's range and rounded."""
    qmax = _QMAX[jnp.dtype(dtype)]
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / qmax  # [..., 1]
    y = jnp.clip(x / jnp.where(scale > 0, scale, 1.0), -qmax, qmax)
    if jnp.issubdtype(dtype, jnp.integer):
        y = jnp.round(y)
    return y.astype(dtype), scale


def dequantize(stored,  # [..., H] float8_e4m3fn or int8
               scale,   # [..., 1] float32 (broadcast against stored)
               dtype=jnp.float32) -> jax.Array:  # [..., H] dtype
    """The values a quantized pool holds: stored * scale."""
    return (stored.astype(jnp.float32) * scale).astype(dtype)


def check_scales(k_pages, v_pages, k_scales, v_scales) -> None:
    """ValueError unless the pools are 8-bit with `[K, P, S, 1]` float32 scales, or float
    without scales."""
    quantized = is_quantized(k_pages.dtype)
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales come together (both or neither)")
    if quantized != (k_scales is not None):
        raise ValueError(f"k_pages dtype {k_pages.dtype} "
                         f"{'needs' if quantized else 'takes no'} k_scales / v_scales")
    if v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages dtype {v_pages.dtype} != k_pages dtype {k_pages.dtype}")
    if not quantized:
        return
    want = scale_pool_shape(*k_pages.shape[:3])
    for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
        if tuple(s.shape) != want or s.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32 {want}, got {s.dtype} {tuple(s.shape)}")
