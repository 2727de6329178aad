"""An 8-bit KV cache under tensor parallelism: the scale pools shard over KV head slots like
the pools they scale, and TP = 2 gives TP = 1's greedy tokens (same kv_cache_dtype) with
prefix caching and preemption. Runs on CPU with 8 host devices (tests/conftest.py)."""

import jax
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.testing.hf_reference import random_prompts

pytestmark = [pytest.mark.slow,  # two engines
              pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices")]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _shard_shape(array):
    return array.addressable_shards[0].data.shape


def test_tp2_with_an_fp8_kv_cache_gives_tp1_tokens_and_shards_the_scales(
        heads8_checkpoint, heads8_engine_kwargs):
    shared = random_prompts([40], seed=3, vocab=256)[0]
    tails = random_prompts([1, 9, 17, 30, 5, 22, 3, 26], seed=4, vocab=256)
    prompts = [{"prompt_token_ids": shared + t if i % 2 else t + shared[:8]}
               for i, t in enumerate(tails)]
    engines = {tp: LLM(heads8_checkpoint, tensor_parallel_size=tp, kv_cache_dtype="fp8",
                       **heads8_engine_kwargs) for tp in (1, 2)}
    tokens = {tp: [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY,
                                                                use_tqdm=False)]
              for tp, llm in engines.items()}
    assert tokens[2] == tokens[1]
    metrics = engines[2].get_metrics()
    assert metrics["num_preemptions"] > 0 and metrics["prefix_cache_hits"] > 0
    k_pool, v_pool, k_scale, v_scale = engines[2].llm_engine.runner.kv_caches[0]
    assert k_pool.dtype == jax.numpy.float8_e4m3fn and k_scale.shape == (2, 12, 16, 1)
    assert _shard_shape(k_pool) == (1, 12, 16, 8)
    assert _shard_shape(k_scale) == _shard_shape(v_scale) == (1, 12, 16, 1)
    assert k_scale.sharding.spec[0] == "model"
