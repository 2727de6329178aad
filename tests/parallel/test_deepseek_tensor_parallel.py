"""DeepSeek-V2 under tensor parallelism: query heads split, the latent pool replicated.

MLA's pool has no KV heads to shard: every rank keeps the whole latent pool (as vLLM does)
and attends with its own query heads. TP = 2 and 4 (the tiny model has 4 heads) must give
TP = 1's greedy tokens with prefix-cache hits and preemptions, without compiling after
warm-up; with expert parallelism on, the routed experts split over the ranks too.
"""

import jax
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.testing import forbid_compilation
from jaxserve.testing.hf_reference import random_prompts

needs_4_devices = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices")
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
# The checkpoint and budgets of conftest's assert_greedy_parity (tests/model/test_deepseek_v2.py):
# the TP = 1 engine reads that run's programs from the session's compilation cache.
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=32, num_gpu_blocks_override=12,
              max_model_len=128, enable_prefix_caching=True, progress=False,
              skip_tokenizer_init=True, background_compilation=False)


@pytest.fixture(scope="module")
def prompts():
    shared = random_prompts([40], seed=3, vocab=256)[0]
    tails = random_prompts([1, 9, 17, 30, 5, 22], seed=4, vocab=256)
    return [shared + t if i % 2 else t + shared[:8] for i, t in enumerate(tails)]


def _generate(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def expected(engine_checkpoint, prompts):
    return _generate(LLM(str(engine_checkpoint("deepseek_v2")), **ENGINE), prompts)


@needs_4_devices
@pytest.mark.parametrize("tp,expert_parallel", [  # TP = 4 with experts split in the default run
    pytest.param(2, False, marks=pytest.mark.slow), (4, True)])
def test_deepseek_v2_tokens_equal_tp1(engine_checkpoint, prompts, expected, tp,
                                      expert_parallel):
    llm = LLM(str(engine_checkpoint("deepseek_v2")), tensor_parallel_size=tp,
              enable_expert_parallel=expert_parallel, **ENGINE)
    with forbid_compilation():
        assert _generate(llm, prompts) == expected
    metrics = llm.get_metrics()
    assert metrics["num_preemptions"] > 0 and metrics["prefix_cache_hits"] > 0
    runner = llm.llm_engine.runner
    (pool,) = runner.kv_caches[0]
    assert pool.addressable_shards[0].data.shape == pool.shape == (12, 16, 40)  # replicated
    attn = runner.params["layers"][0]["self_attn"]
    assert attn["q_b_proj"]["kernel"][...].addressable_shards[0].data.shape == (24, 4 * 24 // tp)
