"""The device KV block pool: sized once at start-up, allocated once, donated every step.

On GPU/TPU the budget is the device's free memory times `gpu_memory_utilization`; on CPU
it is `kv_cache_memory_bytes` (default `CPU_DEFAULT_KV_BYTES`). `num_gpu_blocks_override`
fixes the block count exactly. A pool that cannot hold one max_model_len request is
refused at start-up (such a request could never run). The layout of each pool comes from
the kernels (`kv_pool_shape`, or `latent_pool_shape` for MLA models); `kv_cache_dtype` "fp8" / "int8"
stores K/V 8-bit with float16 scale pools beside them (`kv_quant`), and the block cost counts
both, so the same budget buys more blocks. Block 0 is the null block that padding reads and
writes. Under tensor parallelism each device holds 1/TP of every block (its KV head
slots), so one device's budget buys TP times the blocks; an MLA latent pool is replicated,
so it buys the same.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from jaxserve.config import CacheConfig, ModelConfig
from jaxserve.parallel.sharding import kv_pool_sharding, no_sharding
from pallas_kernels.mla_paged_attention import latent_pool_shape
from pallas_kernels.ragged_paged_attention import kv_pool_shape, kv_quant

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 2 * 1024**3
# Without an explicit budget or override, never more blocks than this (a tiny model on a
# big budget would otherwise get millions of blocks that only slow the block pool down).
MAX_DEFAULT_BLOCKS = 65536


# --kv-cache-dtype names of the 8-bit storage types (CacheConfig.kv_cache_dtype).
_QUANTIZED_KV_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "int8": "int8"}


def kv_storage_dtype(model_config: ModelConfig, kv_cache_dtype: str = "auto") -> str:
    """The dtype the K/V pools store: the model dtype for "auto", else the 8-bit type."""
    return _QUANTIZED_KV_DTYPES.get(kv_cache_dtype, model_config.dtype)


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """How many blocks the pool holds and what one block costs."""

    num_blocks: int  # L, the null block 0 included
    block_size: int  # S tokens per block
    bytes_per_block: int  # on one device: all layers, all pools, its KV head slots
    max_num_seqs_at_full_length: float  # (L - 1) blocks / blocks per max_model_len sequence
    # What the K/V pools store (`kv_storage_dtype`): the model dtype, or float8_e4m3fn /
    # int8, whose layers then carry two float16 scale pools as well.
    kv_dtype: str = "float32"


def layer_pools(model_config: ModelConfig, num_blocks: int, block_size: int,
                kv_dtype: str | None = None) -> tuple[tuple[tuple[int, ...], str], ...]:
    """(shape, dtype) of each pool of one layer: a key and a value pool `[K, L, S, H]` of
    `kv_dtype` (default: the model's); for an 8-bit `kv_dtype` then a key-scale and a
    value-scale pool `[K, L, S, 1]` float16 (`kv_quant.SCALE_DTYPE`); for MLA
    (`kv_latent_dim` set) one latent pool `[L, S, C + Hr]` (`latent_pool_shape`) of the
    model dtype."""
    kv_dtype = kv_dtype or model_config.dtype
    if model_config.kv_latent_dim is not None:
        return ((latent_pool_shape(num_blocks, block_size, model_config.kv_latent_dim),
                 model_config.dtype),)
    shape = kv_pool_shape(model_config.num_kv_heads, num_blocks, block_size,
                          model_config.head_dim)
    pools = ((shape, kv_dtype), (shape, kv_dtype))
    if kv_quant.is_quantized(kv_dtype):
        scales = kv_quant.scale_pool_shape(model_config.num_kv_heads, num_blocks, block_size)
        scale_dtype = kv_quant.SCALE_DTYPE.name
        pools += ((scales, scale_dtype), (scales, scale_dtype))
    return pools


def layer_pool_shapes(model_config: ModelConfig, num_blocks: int, block_size: int,
                      kv_dtype: str | None = None) -> tuple[tuple[int, ...], ...]:
    """The shapes of `layer_pools`."""
    return tuple(shape for shape, _ in layer_pools(model_config, num_blocks, block_size,
                                                   kv_dtype))


def bytes_per_block(model_config: ModelConfig, block_size: int, *, num_shards: int = 1,
                    kv_dtype: str | None = None) -> int:
    """Bytes one block costs on one device, all layers, scales included: K/V pools split
    over `num_shards` devices by KV head slots; an MLA latent pool is replicated on every
    device."""
    per_layer = sum(math.prod(shape) * jnp.dtype(dtype).itemsize for shape, dtype in
                    layer_pools(model_config, 1, block_size, kv_dtype))
    if model_config.kv_latent_dim is None:
        per_layer //= num_shards
    return model_config.num_layers * per_layer


def _budget_bytes(cache_config: CacheConfig, device: jax.Device) -> tuple[int, bool]:
    """(bytes for the pool, whether the user fixed the budget)."""
    if cache_config.kv_cache_memory_bytes is not None:
        return cache_config.kv_cache_memory_bytes, True
    if device.platform == "cpu":
        return CPU_DEFAULT_KV_BYTES, False
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit", 0)
    in_use = stats.get("bytes_in_use", 0)
    return max(0, int(limit * cache_config.gpu_memory_utilization) - in_use), True


def plan_kv_cache(model_config: ModelConfig, cache_config: CacheConfig,
                  device: jax.Device | None = None, *, num_shards: int = 1) -> KVCacheSpec:
    """Decides the number of blocks (call after the weights are on the device);
    `num_shards` devices split every block (the KV head slots of `model_config`)."""
    device = device or jax.devices()[0]
    block_size = cache_config.block_size
    kv_dtype = kv_storage_dtype(model_config, cache_config.kv_cache_dtype)
    per_block = bytes_per_block(model_config, block_size, num_shards=num_shards,
                                kv_dtype=kv_dtype)
    if cache_config.num_gpu_blocks_override is not None:
        num_blocks = cache_config.num_gpu_blocks_override
    else:
        budget, explicit = _budget_bytes(cache_config, device)
        num_blocks = budget // per_block
        if not explicit:
            num_blocks = min(num_blocks, MAX_DEFAULT_BLOCKS)
    blocks_per_seq = math.ceil(model_config.max_model_len / block_size)
    if num_blocks < 1 + blocks_per_seq:
        # Refused now, before any compilation: a request the whole pool cannot hold would
        # wait forever, so the pool must hold one max_model_len request beside the null block.
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks of {block_size} tokens ({per_block} "
            f"bytes each, the null block included); one max_model_len="
            f"{model_config.max_model_len} request needs {1 + blocks_per_seq}: raise "
            "kv_cache_memory_bytes, gpu_memory_utilization or num_gpu_blocks_override, or "
            "lower max_model_len")
    spec = KVCacheSpec(num_blocks, block_size, per_block, (num_blocks - 1) / blocks_per_seq,
                       kv_dtype)
    logger.info("KV cache: %d blocks of %d tokens, %s (%.1f MiB); max concurrency %.1fx at "
                "%d tokens", num_blocks, block_size, kv_dtype, num_blocks * per_block / 2**20,
                spec.max_num_seqs_at_full_length, model_config.max_model_len)
    return spec


def _replicated(mesh: jax.sharding.Mesh | None) -> jax.sharding.Sharding:
    if mesh is None:
        return no_sharding()
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def allocate_kv_caches(model_config: ModelConfig, spec: KVCacheSpec, *,
                       mesh: jax.sharding.Mesh | None = None):
    """One tuple of zeroed pools per layer (`layer_pools`: key and value, their scales when
    8-bit, or MLA's latent pool), placed (committed) with the pool sharding, exactly as every
    step returns them: K/V pools and their scales shard over KV heads, a latent pool is
    replicated."""
    pools = layer_pools(model_config, spec.num_blocks, spec.block_size, spec.kv_dtype)
    makers = {(shape, dtype): jax.jit(functools.partial(jnp.zeros, shape, dtype),
                                      out_shardings=(kv_pool_sharding(shape, mesh)
                                                     if len(shape) == 4 else _replicated(mesh)))
              for shape, dtype in set(pools)}  # one program per distinct pool
    return tuple(tuple(makers[pool]() for pool in pools)
                 for _ in range(model_config.num_layers))
