"""Quantized weights: `QuantizedWeight`, a Linear kernel kept as small integers and scales.

A [K, N] ("kn") kernel is cut along K (the input dimension) into groups of `group_size`
rows; each group and column has a scale and, for the asymmetric forms, a min (float32, or
float16 where GGUF stores them so: read as exactly those float32 values): w = q * scale +
min, or w = (q - zero) * scale with zero 0 (int8) or 8 (int4). The
value is a pytree (packed, scales, mins), so it lives in an `nnx.Param` like any array and
`Ops.dense` / `gated_mlp` take it where a model passes its kernel (a tied embedding kept
quantized is one too, [D, V]: `take_columns` looks rows up); `dequantize()` is the
reference every kernel is tested against. `quantize()` makes one from float weights (the
`--quantization int8 | int4` of HF checkpoints); the GGUF reader repacks stored blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# int4's group along K: the larger where K allows it, else the smaller.
INT4_GROUP_SIZES = (128, 32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A [K, N] kernel as integers + per-group scales [+ mins] (see the module docstring)."""

    # bits 8: int8 [K, N]; bits 4: uint8 [K/2, N], row i holding rows 2i (low nibble) and
    # 2i + 1 (high nibble) of q, so that a shard of rows is a shard of K.
    packed: jax.Array
    scales: jax.Array  # float32 or float16 [K / group_size, N]
    mins: jax.Array | None  # scales' dtype [K / group_size, N]; None: symmetric around `zero`
    bits: int = dataclasses.field(metadata=dict(static=True))  # 8 or 4
    group_size: int = dataclasses.field(metadata=dict(static=True))  # rows of K per scale
    dtype_name: str = dataclasses.field(metadata=dict(static=True))  # what dequantize() gives

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")

    @property
    def shape(self) -> tuple[int, int]:  # (K, N)
        rows = self.packed.shape[0] * (2 if self.bits == 4 else 1)
        return (rows, self.packed.shape[1])

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(jnp.dtype(self.dtype_name))

    @property
    def zero(self) -> int:
        """The q that means 0 in the symmetric forms."""
        return 8 if self.bits == 4 else 0

    def __getitem__(self, index):  # `param[...]` on an nnx.Param holding one
        if index is not Ellipsis:
            raise TypeError("a QuantizedWeight is read whole (param[...]); dequantize() it "
                            "to index it")
        return self

    def dequantize(self, dtype=None) -> jax.Array:  # [K, N]
        """The float weight it stands for, computed in float32 and cast to `dtype` (None:
        its own). On numpy arrays it stays in numpy (no fused multiply-add)."""
        xp = np if isinstance(self.packed, np.ndarray) else jnp
        q = unpack(self.packed, self.bits, xp).astype(xp.float32)  # [K, N]
        k, n = q.shape
        q = q.reshape(k // self.group_size, self.group_size, n)  # [G, g, N]
        scales = self.scales.astype(xp.float32)[:, None, :]  # [G, 1, N]
        if self.mins is None:
            w = (q - xp.float32(self.zero)) * scales
        else:
            w = q * scales + self.mins.astype(xp.float32)[:, None, :]
        return w.reshape(k, n).astype(self.dtype if dtype is None else dtype)

    def take_columns(self, ids,  # [T] int32 column indices
                     dtype=None) -> jax.Array:  # [T, K]
        """Columns `ids` of the weight dequantized, one row each: a quantized [D, V]
        embedding's lookup, which dequantizes only the rows it gathers."""
        return self.map(lambda a: jnp.take(a, ids, axis=1)).dequantize(dtype).T

    def map(self, fn) -> QuantizedWeight:
        """The same weight with `fn` applied to each of its arrays (placement, slicing)."""
        return dataclasses.replace(self, packed=fn(self.packed), scales=fn(self.scales),
                                   mins=None if self.mins is None else fn(self.mins))


def unpack(packed, bits: int, xp=jnp):  # [K or K/2, N] -> [K, N] int32 q
    if bits == 8:
        return packed.astype(xp.int32)
    p = packed.astype(xp.int32)
    low, high = p & 0xF, p >> 4  # rows 2i and 2i + 1
    return xp.stack([low, high], axis=1).reshape(2 * p.shape[0], p.shape[1])


def pack_int4(q: np.ndarray) -> np.ndarray:  # [K, N] values 0..15 -> [K/2, N] uint8
    q = q.astype(np.uint8)
    return q[0::2] | (q[1::2] << np.uint8(4))


def int4_group_size(k: int, sizes: tuple[int, ...] = INT4_GROUP_SIZES) -> int | None:
    """The int4 group size for K input rows (the first of `sizes` that divides K), or None
    when none does."""
    return next((g for g in sizes if k % g == 0), None)


def parse_quantization(name: str) -> tuple[str, tuple[int, ...]]:
    """A `--quantization` value that quantizes at load as (kind, int4 group sizes to try):
    "int8", "int4" (128, else 32), "int4_g32" (32)."""
    kinds = {"int8": ("int8", ()), "int4": ("int4", INT4_GROUP_SIZES),
             "int4_g32": ("int4", (32,))}
    if name not in kinds:
        raise ValueError(f"quantization must be one of {tuple(kinds)}, got {name!r}")
    return kinds[name]


def quantize(w: np.ndarray,  # [K, N] float
             kind: str, *, group_size: int | None = None,
             dtype=None) -> QuantizedWeight:
    """`w` as "int8" (symmetric, one scale per column unless `group_size`) or "int4"
    (asymmetric: scale and min per group of `group_size` rows, default `int4_group_size`).
    Round to nearest; numpy in, numpy out; `dtype` (default w's) is what it dequantizes to."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    if kind not in ("int8", "int4"):
        raise ValueError(f"kind must be 'int8' or 'int4', got {kind!r}")
    group = group_size or (k if kind == "int8" else int4_group_size(k))
    if group is None or k % group or (kind == "int4" and group % 2):
        raise ValueError(f"group_size {group} does not divide K={k} into even groups")
    blocks = w.reshape(k // group, group, n)  # [G, g, N]
    dtype_name = jnp.dtype(dtype or np.float32).name
    if kind == "int8":
        scales = np.abs(blocks).max(axis=1) / np.float32(127)  # [G, N]
        inverse = np.where(scales == 0, 0, 1 / np.where(scales == 0, 1, scales))
        q = np.clip(np.rint(blocks * inverse[:, None, :]), -127, 127).astype(np.int8)
        return QuantizedWeight(q.reshape(k, n), scales.astype(np.float32), None, 8, group,
                               dtype_name)
    low, high = blocks.min(axis=1), blocks.max(axis=1)  # [G, N]
    scales = (high - low) / np.float32(15)
    inverse = np.where(scales == 0, 0, 1 / np.where(scales == 0, 1, scales))
    q = np.clip(np.rint((blocks - low[:, None, :]) * inverse[:, None, :]), 0, 15)
    return QuantizedWeight(pack_int4(q.reshape(k, n)), scales.astype(np.float32),
                           low.astype(np.float32), 4, group, dtype_name)
