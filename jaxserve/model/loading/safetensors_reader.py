"""Memory-mapped reading of a directory of `*.safetensors` files, sharded or not.

A safetensors file is an 8-byte little-endian header length, a JSON header (name ->
dtype, shape, byte offsets) and the raw data. Reading the header ourselves lets every
tensor be a zero-copy numpy view of one `np.memmap` per file, with bfloat16 and float8
through ml_dtypes (numpy has no bfloat16, so `safe_open(framework="numpy")` rejects it).
"""

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np

# safetensors dtype tag -> numpy dtype.
_DTYPES: tuple[tuple[str, np.dtype], ...] = (
    ("F64", np.dtype(np.float64)), ("F32", np.dtype(np.float32)),
    ("F16", np.dtype(np.float16)), ("BF16", np.dtype(ml_dtypes.bfloat16)),
    ("F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn)), ("F8_E5M2", np.dtype(ml_dtypes.float8_e5m2)),
    ("I64", np.dtype(np.int64)), ("I32", np.dtype(np.int32)), ("I16", np.dtype(np.int16)),
    ("I8", np.dtype(np.int8)), ("U8", np.dtype(np.uint8)), ("BOOL", np.dtype(np.bool_)),
)
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live."""

    path: str  # the .safetensors file holding it
    dtype: np.dtype  # element type, numpy/ml_dtypes
    shape: tuple[int, ...]  # as stored (torch layout: Linear weights are [out, in])
    start: int  # first byte, counted from the start of the file
    end: int  # one past the last byte


class SafetensorsReader:
    """Tensor name -> memory-mapped numpy array over every checkpoint file of a directory."""

    def __init__(self, model_dir: str):
        self.model_dir = os.fspath(model_dir)
        self.entries = {name: entry for path in _checkpoint_files(self.model_dir)
                        for name, entry in _read_header(path).items()}  # name -> TensorEntry
        self._maps: dict[str, np.memmap] = {}  # path -> the file's read-only memmap

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def total_bytes(self) -> int:
        return sum(entry.end - entry.start for entry in self.entries.values())

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only view of the mapped file (nothing read until used)."""
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.model_dir}")
        if entry.path not in self._maps:
            self._maps[entry.path] = np.memmap(entry.path, dtype=np.uint8, mode="r")
        raw = self._maps[entry.path][entry.start:entry.end]
        return raw.view(entry.dtype).reshape(entry.shape)


def _checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return [os.path.join(model_dir, name) for name in names]


def _read_header(path: str) -> dict[str, TensorEntry]:
    dtypes = dict(_DTYPES)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(path, dtypes[info["dtype"]], tuple(info["shape"]),
                                    data_start + begin, data_start + end)
    return entries
