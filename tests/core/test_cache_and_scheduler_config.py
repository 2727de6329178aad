"""CacheConfig and SchedulerConfig: defaults, frozen, each violation named with its range."""

import dataclasses

import pytest

from jaxserve.config import CacheConfig, SchedulerConfig


def test_cache_config_defaults():
    config = CacheConfig()
    assert (config.block_size, config.enable_prefix_caching, config.num_gpu_blocks_override,
            config.gpu_memory_utilization, config.kv_cache_memory_bytes,
            config.kv_cache_dtype) == (16, True, None, 0.9, None, "auto")


def test_scheduler_config_defaults():
    config = SchedulerConfig()
    assert (config.long_prefill_token_threshold, config.policy, config.max_num_waiting,
            config.async_scheduling) == (0, "fcfs", None, True)


@pytest.mark.parametrize("field, value, allowed", [
    ("block_size", 12, "power of two"), ("block_size", 512, r"\[1, 256\]"),
    ("num_gpu_blocks_override", 1, ">= 2"), ("gpu_memory_utilization", 0.0, r"\(0, 1\]"),
    ("gpu_memory_utilization", 1.5, r"\(0, 1\]"), ("kv_cache_memory_bytes", 0, "positive"),
    ("enable_prefix_caching", "yes", "bool"), ("kv_cache_dtype", "fp16", "'fp8', 'fp8_e4m3'")])
def test_cache_config_names_the_bad_field_and_its_range(field, value, allowed):
    with pytest.raises(ValueError, match=f"CacheConfig.{field} must be .*{allowed}"):
        CacheConfig(**{field: value})


@pytest.mark.parametrize("field, value, allowed", [
    ("max_num_batched_tokens", 0, ">= 1"), ("max_num_seqs", -1, ">= 1"),
    ("max_model_len", 2.5, ">= 1"), ("long_prefill_token_threshold", -1, ">= 0"),
    ("policy", "lifo", "fcfs"), ("max_num_waiting", 0, ">= 1"),
    ("async_scheduling", "yes", "True or False")])
def test_scheduler_config_names_the_bad_field_and_its_range(field, value, allowed):
    with pytest.raises(ValueError, match=f"SchedulerConfig.{field} must be .*{allowed}"):
        SchedulerConfig(**{field: value})


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SchedulerConfig().max_num_seqs = 3
