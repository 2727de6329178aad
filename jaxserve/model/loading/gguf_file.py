"""A GGUF file's header, metadata and tensor table, parsed with `struct` over a memory map.

`GGUFFile(path)` reads the metadata key/values and the tensor table in milliseconds and
leaves the tensor data mapped, untouched until a tensor is read. Written here rather than
taken from the `gguf` package because its `GGUFReader` builds a numpy view per array
element: about 5 s for a 49k-token vocabulary, paid again by every reader, while the engine
needs the vocabulary only for the tokenizer. String arrays (vocabulary, merges) are decoded
on first access. Dequantization stays with `gguf.quants`.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64
metadata count; the metadata as (string key, u32 type, value); the tensor table as (string
name, u32 dims, u64 dims..., u32 ggml type, u64 offset); then, at the next multiple of
`general.alignment` (32), the tensor data. Strings are a u64 length and UTF-8 bytes.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
# metadata value type -> struct format of a fixed-size scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
# ggml types stored as plain values: their numpy dtype (gguf.quants reads the others, BF16
# included, as uint8 rows)
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64,
          GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
          GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: `data` is a read-only view of its stored bytes."""

    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    tensor_type: GGMLQuantizationType
    n_bytes: int
    # plain types: [*reversed(shape)] of the type; blocks: uint8 [*outer, row bytes]
    data: np.ndarray


class _StringArray:
    """A metadata string array, decoded on first use (`strings()`)."""

    def __init__(self, blob: memoryview, start: int, count: int):
        self._blob, self._start, self.count = blob, start, count
        self._values: list[str] | None = None

    def strings(self) -> list[str]:
        if self._values is None:
            values, pos, blob = [], self._start, self._blob
            for _ in range(self.count):
                (length,) = struct.unpack_from("<Q", blob, pos)
                values.append(bytes(blob[pos + 8:pos + 8 + length]).decode("utf-8"))
                pos += 8 + length
            self._values = values
        return self._values


class GGUFFile:
    """The parsed file: `metadata` (key -> value), `tensors` (name -> GGUFTensor)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._map = np.memmap(self.path, mode="r", dtype=np.uint8)  # [file bytes]
        blob = memoryview(self._map)
        if bytes(blob[:4]) != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file (no 'GGUF' magic)")
        version, num_tensors, num_values = struct.unpack_from("<IQQ", blob, 4)
        if version not in _VERSIONS:
            raise ValueError(f"{self.path} is GGUF version {version}; jaxserve reads versions "
                             f"{' and '.join(map(str, _VERSIONS))}")
        pos, self._values = 24, {}
        for _ in range(num_values):
            key, pos = _string(blob, pos)
            (kind,) = struct.unpack_from("<I", blob, pos)
            self._values[key], pos = self._value(blob, pos + 4, kind)
        table = []
        for _ in range(num_tensors):
            name, pos = _string(blob, pos)
            (num_dims,) = struct.unpack_from("<I", blob, pos)
            dims = struct.unpack_from(f"<{num_dims}Q", blob, pos + 4)
            kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * num_dims)
            pos += 4 + 8 * num_dims + 12
            table.append((name, tuple(int(d) for d in dims), kind, offset))
        alignment = int(self.get("general.alignment", 32))
        data_start = -(-pos // alignment) * alignment
        self.tensors = {name: self._tensor(name, dims, kind, data_start + offset)
                        for name, dims, kind, offset in table}

    def get(self, key: str, default=None):
        """One metadata value (scalar, string or list); `default` when absent."""
        value = self._values.get(key, default)
        return value.strings() if isinstance(value, _StringArray) else value

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def _value(self, blob: memoryview, pos: int, kind: int):
        if kind in _SCALARS:
            fmt = "<" + _SCALARS[kind]
            return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
        if kind == _STRING:
            return _string(blob, pos)
        if kind != _ARRAY:
            raise ValueError(f"{self.path}: metadata value of unknown type {kind}")
        item_kind, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item_kind in _SCALARS:
            dtype = np.dtype("<" + _SCALARS[item_kind])
            values = np.frombuffer(blob, dtype, count, pos)  # [count]
            return values.tolist(), pos + count * dtype.itemsize
        if item_kind == _STRING:
            start = pos
            for _ in range(count):  # walk past it; decoded only if asked for
                pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
            return _StringArray(blob, start, count), pos
        items = []  # nested arrays: rare, read one by one
        for _ in range(count):
            item, pos = self._value(blob, pos, item_kind)
            items.append(item)
        return items, pos

    def _tensor(self, name: str, dims: tuple[int, ...], kind: int, start: int) -> GGUFTensor:
        try:
            tensor_type = GGMLQuantizationType(kind)
            block, block_bytes = GGML_QUANT_SIZES[tensor_type]
        except (ValueError, KeyError):
            raise ValueError(f"{self.path}: tensor {name!r} has ggml type {kind}, which the "
                             "gguf package does not know") from None
        elements = int(np.prod(dims))
        n_bytes = elements // block * block_bytes
        if start + n_bytes > len(self._map):
            raise ValueError(f"{self.path} is truncated: tensor {name!r} ends past the file")
        raw = self._map[start:start + n_bytes]  # [n_bytes] uint8
        outer = tuple(reversed(dims[1:]))
        if tensor_type in _PLAIN:
            data = raw.view(_PLAIN[tensor_type]).reshape(*outer, dims[0])
        else:
            data = raw.reshape(*outer, dims[0] // block * block_bytes)
        return GGUFTensor(name, dims, tensor_type, n_bytes, data)


def _string(blob: memoryview, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    return bytes(blob[pos + 8:pos + 8 + length]).decode("utf-8"), pos + 8 + length
