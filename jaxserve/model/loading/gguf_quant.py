"""GGUF's quantized blocks repacked once into `QuantizedWeight`s, so a GGUF stays quantized.

Each ggml block format maps to integers and one scale (and min) per group of K, in the
order llama.cpp dequantizes them, so `dequantize()` equals the gguf package's
dequantization exactly: Q8_0 -> int8 g32; Q4_0 -> int4 g32 ((q - 8) * d); Q4_1 -> int4 g32
with min (d * q + m); Q4_K -> int4 g32 with min (d * sc * q - dmin * m); Q5_K -> int8 g32
with min (5-bit q); Q6_K -> int8 g16 ((d * sc) * (q - 32)). Scales and mins that are a
block's stored float16 values (Q8_0, Q4_0, Q4_1) stay float16, half the bytes of float32
for the kernels to read; the K-quants' products of two scales are float32. Other types
return None (the caller dequantizes them).
"""

from __future__ import annotations

import gguf
import numpy as np

from jaxserve.model.quantization import QuantizedWeight, pack_int4

_T = gguf.GGMLQuantizationType
_NIBBLES = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)


def _f16(raw: np.ndarray) -> np.ndarray:  # [nb, 2] bytes -> [nb, 1] float32
    return raw.view(np.float16).astype(np.float32)


def _stored(raw: np.ndarray) -> np.ndarray:  # [nb, 2] bytes -> [nb, 1] float16, as stored
    return raw.view(np.float16)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:  # [nb, bytes] -> [nb, 2 * bytes]
    """ggml's nibble order: each run of `width` bytes gives `width` low nibbles, then
    `width` high ones."""
    nb = qs.shape[0]
    return ((qs.reshape(nb, -1, 1, width) >> _NIBBLES) & np.uint8(0xF)).reshape(nb, -1)


def _q8_0(blocks):  # [nb, 34] -> q [nb, 32] int8, scales [nb, 1] float16, no mins
    return blocks[:, 2:].view(np.int8), _stored(blocks[:, :2]), None, 8, 32


def _q4_0(blocks):  # [nb, 18]: w = (q - 8) * d
    return _nibbles(blocks[:, 2:], 16), _stored(blocks[:, :2]), None, 4, 32


def _q4_1(blocks):  # [nb, 20]: w = d * q + m
    return _nibbles(blocks[:, 4:], 16), _stored(blocks[:, :2]), _stored(blocks[:, 2:4]), 4, 32


def _k_scales(blocks):  # Q4_K / Q5_K: per 32-row sub-block scale d * sc and min -dmin * m
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])  # [nb, 8] each
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _q4_k(blocks):  # [nb, 144]
    scales, mins = _k_scales(blocks)
    return _nibbles(blocks[:, 16:], 32), scales, mins, 4, 32


def _q5_k(blocks):  # [nb, 176]: 4 low bits as Q4_K, the fifth from qh
    scales, mins = _k_scales(blocks)
    nb = blocks.shape[0]
    low = _nibbles(blocks[:, 48:], 32).reshape(nb, 8, 32)
    bits = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = (blocks[:, 16:48].reshape(nb, 1, 32) >> bits) & np.uint8(1)  # [nb, 8, 32]
    q = (low | (high << np.uint8(4))).astype(np.int8).reshape(nb, 256)
    return q, scales, mins, 8, 32


def _q6_k(blocks):  # [nb, 210]: w = (d * sc) * (q - 32), 16 rows per scale
    nb = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # [nb, 16]
    low = _nibbles(ql, 64).reshape(nb, -1, 32)  # [nb, 8, 32]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = ((qh.reshape(nb, -1, 1, 32) >> shifts) & np.uint8(3)).reshape(nb, -1, 32)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    return q.reshape(nb, 256), _f16(blocks[:, 208:210]) * sc, None, 8, 16


_REPACK = {_T.Q8_0: _q8_0, _T.Q4_0: _q4_0, _T.Q4_1: _q4_1, _T.Q4_K: _q4_k, _T.Q5_K: _q5_k,
           _T.Q6_K: _q6_k}
REPACKED_TYPES = tuple(t.name for t in _REPACK)


def repack(data: np.ndarray,  # uint8 [N, K / block * block bytes]: the stored rows
           tensor_type, num_rows: int, row_length: int, *,
           dtype_name: str = "float32") -> QuantizedWeight | None:  # [K, N]
    """The [N, K] (HF layout) GGUF tensor as a [K, N] kernel, or None for other types."""
    fn = _REPACK.get(tensor_type)
    if fn is None:
        return None
    _, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    q, scales, mins, bits, group = fn(np.asarray(data, np.uint8).reshape(-1, block_bytes))
    n, k = num_rows, row_length
    q = q.reshape(n, k).T  # [K, N]
    packed = pack_int4(q) if bits == 4 else np.ascontiguousarray(q, np.int8)
    kernel = lambda a: np.ascontiguousarray(a.reshape(n, k // group).T)  # noqa: E731
    return QuantizedWeight(packed, kernel(scales), None if mins is None else kernel(mins),
                           bits, group, dtype_name)
