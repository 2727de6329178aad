"""Tensor parallelism over the "model" mesh axis: head checks, KV-head slots, shard_map.

With TP ranks and K KV heads, each rank needs the KV heads of its own query heads. When
K >= TP the KV heads shard as they are; when K < TP they are replicated as vLLM does: the
K/V projections and the pool hold TP "KV head slots", slot r holding head r // (TP // K).
`shard_over_heads` runs a per-shard attention function under `shard_map` over the axis.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

MODEL_AXIS = "model"


def check_tensor_parallel(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """ValueError unless `tp` ranks can split N query heads and place the K KV heads."""
    if num_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the {num_heads} query heads")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp} must divide or be a multiple of the "
                         f"{num_kv_heads} KV heads")


def kv_head_slots(num_kv_heads: int, tp: int) -> int:
    """K' KV head slots the projections and the pool hold: K, or TP when K < TP."""
    return max(num_kv_heads, tp)


def tp_model_config(model_config, tp: int):
    """The config the TP model is built with: `num_kv_heads` widened to the KV head slots."""
    check_tensor_parallel(model_config.num_heads, model_config.num_kv_heads, tp)
    slots = kv_head_slots(model_config.num_kv_heads, tp)
    if slots == model_config.num_kv_heads:
        return model_config
    return dataclasses.replace(model_config, num_kv_heads=slots)


def replicate_kv_heads(tensor: np.ndarray,  # model layout; `axis` is [K * H]
                       axis: int, factor: int, head_dim: int) -> np.ndarray:  # [K*factor*H]
    """Each KV head repeated `factor` times in place: slot r holds head r // factor."""
    if factor == 1:
        return tensor
    shape = tensor.shape
    heads = shape[axis] // head_dim
    split = tensor.reshape(shape[:axis] + (heads, head_dim) + shape[axis + 1:])
    repeated = np.repeat(split, factor, axis=axis)  # [..., K*factor, H, ...]
    return repeated.reshape(shape[:axis] + (heads * factor * head_dim,) + shape[axis + 1:])


def model_axis_size() -> int:
    """Size of the "model" axis of the mesh being traced under (1 when there is none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[MODEL_AXIS]


def shard_over_heads(fn, *, num_head_args: int, num_pool_args: int, num_outputs: int,
                     pool_outputs: bool, mesh=None):
    """`fn` under `shard_map` over the model axis: its first `num_head_args` arguments are
    [T, heads, H] sharded on heads, the next `num_pool_args` are [K, L, S, H] pools sharded
    on K, the rest replicated; outputs are pools (`pool_outputs`) or [T, N, H] per head.
    `mesh` None: the mesh being traced under (`jax.set_mesh`)."""
    heads, pool = P(None, MODEL_AXIS, None), P(MODEL_AXIS, None, None, None)

    def wrapped(*args):
        num_rest = len(args) - num_head_args - num_pool_args
        in_specs = (heads,) * num_head_args + (pool,) * num_pool_args + (P(),) * num_rest
        out = pool if pool_outputs else heads
        out_specs = out if num_outputs == 1 else (out,) * num_outputs
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*args)

    return wrapped
