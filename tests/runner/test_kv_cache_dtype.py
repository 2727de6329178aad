"""kv_cache_dtype sizes and lays out the pools: 8-bit K/V plus float16 scales per token and
KV head, so one memory budget buys more blocks; "auto" keeps the model dtype."""

import dataclasses

import jax.numpy as jnp
import pytest

from jaxserve.config import CacheConfig, ModelConfig
from jaxserve.runner.kv_cache import allocate_kv_caches, bytes_per_block, plan_kv_cache

BUDGET = 64 * 2**20


@pytest.fixture(scope="module")
def config(tiny_checkpoint):
    return ModelConfig.from_pretrained(tiny_checkpoint("qwen2"), dtype="float32")


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e4m3", "int8"])
def test_an_8_bit_kv_cache_buys_more_blocks_with_the_same_budget(config, model_dtype,
                                                                  kv_cache_dtype):
    config = dataclasses.replace(config, dtype=model_dtype)
    plan = lambda kv: plan_kv_cache(config, CacheConfig(  # noqa: E731
        kv_cache_memory_bytes=BUDGET, kv_cache_dtype=kv))
    auto, small = plan("auto"), plan(kv_cache_dtype)
    head_dim, itemsize = config.head_dim, jnp.dtype(model_dtype).itemsize
    # per token, KV head and layer: K and V rows, plus one float16 scale each when 8-bit
    per_row = {"auto": 2 * head_dim * itemsize, "8-bit": 2 * head_dim + 2 * 2}
    rows = config.num_layers * config.num_kv_heads * 16  # one block of 16 tokens
    assert auto.bytes_per_block == rows * per_row["auto"]
    assert small.bytes_per_block == rows * per_row["8-bit"]
    assert (auto.kv_dtype, small.kv_dtype) == (
        model_dtype, "int8" if kv_cache_dtype == "int8" else "float8_e4m3fn")
    assert small.num_blocks == BUDGET // small.bytes_per_block > auto.num_blocks
    print(f"{model_dtype} head_dim {head_dim}: {kv_cache_dtype} holds "
          f"{small.num_blocks / auto.num_blocks:.2f}x the blocks of auto")


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "int8"])
def test_an_8_bit_pool_holds_1_9x_the_blocks_of_bfloat16_at_head_dim_64(config, kv_cache_dtype):
    config = dataclasses.replace(config, dtype="bfloat16", head_dim=64)
    blocks = {kv: plan_kv_cache(config, CacheConfig(kv_cache_memory_bytes=BUDGET,
                                                    kv_cache_dtype=kv)).num_blocks
              for kv in ("auto", kv_cache_dtype)}
    # 256 bytes per token and KV head against 2 * 64 + 2 * 2 (float16 scales): 1.94x
    assert 1.9 <= blocks[kv_cache_dtype] / blocks["auto"] <= 256 / 132


def test_a_quantized_layer_holds_8_bit_pools_and_their_scale_pools(config):
    num_blocks = 1 + -(-config.max_model_len // 16)  # the least the planner accepts
    spec = plan_kv_cache(config, CacheConfig(num_gpu_blocks_override=num_blocks,
                                             kv_cache_dtype="fp8"))
    pools = allocate_kv_caches(config, spec)
    assert len(pools) == config.num_layers
    k, v, k_scale, v_scale = pools[0]
    shape = (config.num_kv_heads, num_blocks, 16, config.head_dim)
    assert k.shape == v.shape == shape and k.dtype == v.dtype == jnp.float8_e4m3fn
    assert k_scale.shape == v_scale.shape == (*shape[:3], 1)
    assert k_scale.dtype == v_scale.dtype == jnp.float16
    assert bytes_per_block(config, 16, kv_dtype="float8_e4m3fn") == spec.bytes_per_block
