"""The quantized KV pool format: 8-bit keys and values with per-token, per-head scales.

A quantized layer keeps four pools: keys and values `[K, P, S, H]` in float8_e4m3fn or
int8, and their scales `[K, P, S, 1]` float16 (`SCALE_DTYPE`, `scale_pool_shape`), laid out
by the same pages, so page tables, sharding over K and the null page carry over unchanged.
Row `(k, p, s)` holds `x / scale` rounded to the storage type, with `scale = absmax(x) / qmax`
over its H values (qmax 448 for e4m3, 127 for int8) rounded up to a float16; it reads back
as `stored.astype(float32) * scale` (`dequantize`). An all-zero row has scale 0 and reads 0.
"""

import jax
import jax.numpy as jnp

# The largest finite magnitude of each storage type: an absmax row maps onto it.
_QMAX = {jnp.dtype(jnp.float8_e4m3fn): 448.0, jnp.dtype(jnp.int8): 127.0}
QUANTIZED_DTYPES = tuple(_QMAX)
# Two bytes per row beside 2 H bytes of K and V: float32 scales would cost 3% of an H = 64
# pool. Rounding a scale up keeps |x / scale| <= qmax; scales past float16's range (absmax
# above 448 * 65504 for e4m3, 127 * 65504 for int8) saturate at its largest finite value,
# and a nonzero absmax below the smallest subnormal (6e-8) still gets that subnormal, so
# no scale is inf and only an all-zero row has scale 0.
SCALE_DTYPE = jnp.dtype(jnp.float16)
_SCALE_MAX = float(jnp.finfo(SCALE_DTYPE).max)


def is_quantized(dtype) -> bool:
    """Whether a pool of `dtype` holds scaled 8-bit rows (and so comes with scales)."""
    return jnp.dtype(dtype) in _QMAX


def scale_pool_shape(num_kv_heads: int, num_pages: int, page_size: int) -> tuple[int, ...]:
    """Shape of one layer's key-scale pool (and value-scale pool): [K, P, S, 1] SCALE_DTYPE.
    The trailing 1 keeps the `[K, P, S, W]` pool layout, so the same row writer and
    sharding serve scales and values."""
    return (num_kv_heads, num_pages, page_size, 1)


def quantize(x,  # [..., H] rows in any float dtype
             dtype,  # the storage dtype: float8_e4m3fn or int8
             ) -> tuple[jax.Array, jax.Array]:  # ([..., H] dtype, [..., 1] float16 scales)
    """Each row scaled by its absmax onto the storage type's range and rounded; the scale is
    the float16 at or above absmax / qmax (see SCALE_DTYPE), and the row is divided by that
    rounded scale, so `dequantize` undoes exactly what was stored."""
    qmax = _QMAX[jnp.dtype(dtype)]
    x = x.astype(jnp.float32)
    wanted = jnp.minimum(jnp.max(jnp.abs(x), axis=-1, keepdims=True) / qmax,
                         _SCALE_MAX)  # [..., 1]; NaN stays NaN
    scale = wanted.astype(SCALE_DTYPE)
    scale = jnp.where(scale.astype(jnp.float32) < wanted,
                      jnp.nextafter(scale, jnp.asarray(jnp.inf, SCALE_DTYPE)), scale)
    wide = scale.astype(jnp.float32)
    y = jnp.clip(x / jnp.where(wide > 0, wide, 1.0), -qmax, qmax)
    if jnp.issubdtype(dtype, jnp.integer):
        y = jnp.round(y)
    return y.astype(dtype), scale


def dequantize(stored,  # [..., H] float8_e4m3fn or int8
               scale,   # [..., 1] float16 (or float32) scales, broadcast against stored
               dtype=jnp.float32) -> jax.Array:  # [..., H] dtype
    """The values a quantized pool holds: stored * scale."""
    return (stored.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def check_scales(k_pages, v_pages, k_scales, v_scales) -> None:
    """ValueError unless the pools are 8-bit with `[K, P, S, 1]` float16 scales, or float
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
        if tuple(s.shape) != want or s.dtype != SCALE_DTYPE:
            raise ValueError(f"{name} must be {SCALE_DTYPE} {want}, "
                             f"got {s.dtype} {tuple(s.shape)}")
