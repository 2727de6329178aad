"""LLM.generate gives HF's greedy tokens, however the engine batches, chunks or caches.

The default run checks qwen2 on the session's shared engine (`qwen2_llm`, built with
`engine_kwargs`); the other families' engine runs are slow (tests/model/test_llama_parity.py
checks each family's logits in the default run).
"""

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.testing.hf_reference import hf_greedy, random_prompts

# Prompt lengths around block boundaries (S = 16), up to 300.
PROMPT_LENS = [1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 100, 127, 128, 129,
               150, 200, 255, 256, 257, 300]

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _generate(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(PROMPT_LENS)


@pytest.fixture(scope="module")
def hf_reference(engine_checkpoint, prompts):
    return {family: hf_greedy(engine_checkpoint(family), prompts, NEW_TOKENS)
            for family in ("qwen2",)}


@pytest.mark.parametrize("family", [
    pytest.param(family, marks=() if family == "qwen2" else pytest.mark.slow)
    for family in ("llama", "qwen2", "mistral", "qwen3", "llama_head_dim")])
def test_greedy_tokens_equal_transformers(engine_checkpoint, engine_kwargs, prompts, family,
                                          request):
    path = engine_checkpoint(family)
    if family == "qwen2":  # the shared engine: the same checkpoint and engine_kwargs
        llm = request.getfixturevalue("qwen2_llm")
        expected = request.getfixturevalue("hf_reference")["qwen2"]
    else:
        llm, expected = LLM(str(path), **engine_kwargs), hf_greedy(path, prompts, NEW_TOKENS)
    assert _generate(llm, prompts) == expected
    assert llm.get_metrics()["num_compilations_after_warm_up"] == 0


# Chunked prefill and preemption are slow here: conftest's assert_greedy_parity runs (the MoE
# and MLA models, default run) chunk every prompt into 32-token steps and must preempt.
@pytest.mark.parametrize("kwargs", [
    dict(enable_prefix_caching=False),
    pytest.param(dict(max_num_batched_tokens=32),         # chunked prefill of every prompt
                 marks=pytest.mark.slow, id="chunked-32"),
    pytest.param(dict(num_gpu_blocks_override=40, max_num_seqs=8),  # a pool that preempts
                 marks=pytest.mark.slow, id="preemption"),
    dict(long_prefill_token_threshold=24),
], ids=["no-prefix-cache", "chunked-32", "preemption", "long-prefill-threshold"])
def test_scheduling_choices_never_change_greedy_tokens(engine_checkpoint, engine_kwargs, prompts,
                                                       hf_reference, kwargs):
    llm = LLM(str(engine_checkpoint("qwen2")), **{**engine_kwargs, **kwargs})
    assert _generate(llm, prompts) == hf_reference["qwen2"]
    metrics = llm.get_metrics()
    if "num_gpu_blocks_override" in kwargs:
        assert metrics["num_preemptions"] > 0
    assert metrics["kv_cache_usage"] == 0.0


def test_shared_prefixes_hit_the_cache_and_keep_tokens(engine_checkpoint, qwen2_llm):
    prefix = random_prompts([70], seed=1)[0]
    prompts = [prefix + tail for tail in random_prompts([1, 5, 20, 33], seed=2)]
    before = qwen2_llm.get_metrics()["prefix_cache_hits"]
    tokens = _generate(qwen2_llm, prompts)
    assert qwen2_llm.get_metrics()["prefix_cache_hits"] - before >= 64 * 3
    assert tokens == hf_greedy(engine_checkpoint("qwen2"), prompts, NEW_TOKENS)
