"""Which weights load quantized, read and placed as `QuantizedWeight`s.

A Linear kernel (a 2-D parameter the checkpoint stores transposed, read whole) loads
quantized when `quantization` asks for it: "int8" / "int4" quantize the checkpoint's float
values at load ("int4_g32": int4 in groups of 32 throughout); None keeps a GGUF's stored
quantization (repacked, gguf_quant.py) and loads everything else as stored; "none" loads
every weight as float. Each part of the weight is placed with the kernel's logical axes;
under TP a K axis splits only where the groups of K split with it (else that axis is
replicated). An embedding table the checkpoint stores
quantized stays so as stored (`quantizable_head`).
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh

from jaxserve.model.quantization import (QuantizedWeight, int4_group_size, parse_quantization,
                                        quantize)
from jaxserve.parallel.sharding import logical_sharding, logical_to_spec
from jaxserve.parallel.tensor_parallel import replicate_kv_heads

logger = logging.getLogger(__name__)


def quantizable(meta: dict) -> bool:
    """Whether the parameter is a Linear kernel read whole, which `Ops.dense` consumes."""
    axes = meta.get("axes") or ()
    return (bool(meta.get("hf_transpose")) and len(axes) == 2 and meta.get("quantizable", True)
            and all(meta.get(key) is None
                    for key in ("hf_stack", "hf_rows", "hf_normalize_axis")))


def quantizable_head(meta: dict) -> bool:
    """Whether the parameter is an embedding table ([V, D], not transposed) that may stay
    quantized as stored: read as a [D, V] kernel, the tied head's (`layers.Embed`)."""
    return bool(meta.get("hf_quantized_head")) and not meta.get("hf_transpose")


def read_quantized(reader, name: str,
                   expected: tuple[int, int],  # (N, K): the checkpoint's [out, in] shape
                   quantization: str | None, dtype_name: str) -> QuantizedWeight | None:
    """Tensor `name` as a host [K, N] QuantizedWeight, or None: load it as float."""
    if quantization == "none" or name not in reader:
        return None  # a missing tensor fails on the float path, with its message
    if quantization is None:
        get = getattr(reader, "get_quantized", None)  # GGUF only
        weight = None if get is None else get(name, dtype_name)
    else:
        n, k = expected
        kind, group_sizes = parse_quantization(quantization)
        group = int4_group_size(k, group_sizes) if kind == "int4" else None
        if kind == "int4" and group is None:
            logger.info("%s: K=%d has no int4 group size, loading it as float", name, k)
            return None
        values = reader.get(name)
        if tuple(values.shape) != expected:
            return None  # the float path names both shapes
        weight = quantize(np.asarray(values, np.float32).T, kind, group_size=group,
                          dtype=dtype_name)
    if weight is not None and weight.shape != expected[::-1]:
        raise ValueError(f"tensor {name!r} has shape {weight.shape[::-1]} in the checkpoint, "
                         f"the model expects {expected}")
    return weight


def place_quantized(weight: QuantizedWeight,  # host [K, N]
                    axes: tuple[str | None, str | None], mesh: Mesh | None, rules, *,
                    kv_factor: int = 1, head_dim: int = 0) -> QuantizedWeight:
    """The weight on the devices, each part sharded by the kernel's `axes`; KV heads
    repeated `kv_factor` times along N first (the model's KV head slots)."""
    if kv_factor > 1:
        weight = weight.map(lambda a: replicate_kv_heads(a, 1, kv_factor, head_dim))
    if mesh is not None:
        by_rows = logical_to_spec(axes, weight.packed.shape, mesh, rules=rules)[0]
        by_groups = logical_to_spec(axes, weight.scales.shape, mesh, rules=rules)[0]
        if by_rows != by_groups:  # a shard boundary would cut a group of K
            axes = (None, axes[1])
    return weight.map(lambda a: jax.device_put(
        a, logical_sharding(axes, a.shape, mesh, rules=rules)))
