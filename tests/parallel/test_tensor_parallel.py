"""Tensor parallelism through `LLM(..., tensor_parallel_size=N)`: same tokens, 1/TP memory.

A tiny Qwen2 with 8 query heads and 2 KV heads covers KV heads < TP (replicated slots).
Runs on CPU with 8 host devices (tests/conftest.py sets XLA_FLAGS before jax starts).
"""

import jax
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.parallel.tensor_parallel import replicate_kv_heads
from jaxserve.testing import forbid_compilation
from jaxserve.testing.hf_reference import random_prompts

needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts():
    shared = random_prompts([40], seed=3, vocab=256)[0]  # a cached prefix for half
    tails = random_prompts([1, 9, 17, 30, 5, 22, 3, 26], seed=4, vocab=256)
    return [shared + t if i % 2 else t + shared[:8] for i, t in enumerate(tails)]


def _generate(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def engines(heads8_checkpoint, heads8_engine_kwargs):
    """`engines[tp]`: the engine at that TP size, built on first use (12 blocks of 16 tokens
    for 8 prompts of up to 82 tokens: preemption)."""
    class Engines(dict):
        def __missing__(self, tp):
            self[tp] = LLM(heads8_checkpoint, tensor_parallel_size=tp, **heads8_engine_kwargs)
            return self[tp]

    return Engines()


# TP = 4 (KV heads replicated into slots; test_orbax_checkpoint.py's TP = 4 engines then
# read its programs) in the default run; TP = 2 (one KV head per rank, whose logits
# tests/parallel/test_sharding.py checks in the default run) and 8 are slow.
TP_SIZES = [pytest.param(2, marks=pytest.mark.slow), 4, pytest.param(8, marks=pytest.mark.slow)]


@needs_8_devices
@pytest.mark.parametrize("tp", TP_SIZES)
def test_greedy_tokens_equal_tp1_with_prefix_caching_and_preemption(engines, prompts, tp):
    expected, llm = _generate(engines[1], prompts), engines[tp]  # built before the check
    with forbid_compilation():
        assert _generate(llm, prompts) == expected
    metrics = llm.get_metrics()
    assert metrics["num_preemptions"] > 0
    assert metrics["prefix_cache_hits"] > 0


def _shard_shape(array):
    return array.addressable_shards[0].data.shape


@needs_8_devices
@pytest.mark.parametrize("tp", TP_SIZES)
def test_params_and_pool_shard_over_the_model_axis(engines, tp):
    runner = engines[tp].llm_engine.runner
    layer = runner.params["layers"][0]
    slots = max(2, tp)  # KV head slots: KV heads replicated when TP > 2
    assert _shard_shape(layer["self_attn"]["q_proj"]["kernel"][...]) == (64, 64 // tp)
    assert _shard_shape(layer["self_attn"]["k_proj"]["kernel"][...]) == (64, slots * 8 // tp)
    assert _shard_shape(layer["self_attn"]["o_proj"]["kernel"][...]) == (64 // tp, 64)
    assert _shard_shape(layer["mlp"]["gate_proj"]["kernel"][...]) == (64, 128 // tp)
    assert _shard_shape(layer["mlp"]["down_proj"]["kernel"][...]) == (128 // tp, 64)
    assert _shard_shape(runner.params["embed_tokens"]["embedding"][...]) == (256 // tp, 64)
    k_pool, v_pool = runner.kv_caches[0]
    assert k_pool.shape == (slots, 12, 16, 8)
    assert _shard_shape(k_pool) == _shard_shape(v_pool) == (slots // tp, 12, 16, 8)
    assert k_pool.sharding.spec[0] == "model"
    assert len(k_pool.sharding.device_set) == tp


def test_replicated_kv_slot_r_holds_head_r_over_factor():
    kernel = np.arange(2 * 3 * 4).reshape(3, 2 * 4)  # [D=3, K=2 * H=4]
    slots = replicate_kv_heads(kernel, 1, 4, 4).reshape(3, 8, 4)  # 8 slots
    for r in range(8):
        np.testing.assert_array_equal(slots[:, r], kernel.reshape(3, 2, 4)[:, r // 4])
