"""Sizing the KV pool: a pool that cannot hold one max_model_len request is refused at
start-up, naming the options that fix it, rather than leaving such a request to wait
forever (or failing only after every program compiled)."""

import pytest

from jaxserve.config import CacheConfig, ModelConfig
from jaxserve.runner.kv_cache import bytes_per_block, plan_kv_cache


@pytest.fixture(scope="module")
def model_config(engine_checkpoint):
    return ModelConfig.from_pretrained(engine_checkpoint("qwen2"), max_model_len=256)


def test_a_pool_holding_one_max_model_len_request_is_accepted(model_config):
    spec = plan_kv_cache(model_config, CacheConfig(num_gpu_blocks_override=17))  # 1 + 256 / 16
    assert spec.num_blocks == 17 and spec.max_num_seqs_at_full_length == 1.0


@pytest.mark.parametrize("option", ["num_gpu_blocks_override", "kv_cache_memory_bytes"])
def test_a_pool_too_small_for_one_max_model_len_request_is_refused_naming_the_options(
        model_config, option):
    sixteen = {"num_gpu_blocks_override": 16,  # or a budget just over 16 blocks' bytes
               "kv_cache_memory_bytes": 16 * bytes_per_block(model_config, 16) + 1}[option]
    with pytest.raises(ValueError, match=r"holds 16 blocks .* max_model_len=256 request "
                                         r"needs 17: raise kv_cache_memory_bytes") as error:
        plan_kv_cache(model_config, CacheConfig(**{option: sixteen}))
    assert "lower max_model_len" in str(error.value)
