"""Engine fixtures: tiny checkpoints with a tokenizer, small engines, HF greedy references."""

import pytest

# Small budgets keep warm-up to a handful of programs: T buckets 16..128, B buckets 8, 16.
ENGINE_KWARGS = dict(max_num_seqs=16, max_num_batched_tokens=128, progress=False)


@pytest.fixture(scope="session")
def engine_kwargs():
    return dict(ENGINE_KWARGS)

@pytest.fixture(scope="session")
def engine_checkpoint(tiny_checkpoint):
    """`engine_checkpoint(family)`: a tiny checkpoint with tokenizer, 320-token vocab."""
    return lambda family="qwen2": tiny_checkpoint(family, with_tokenizer=True)


@pytest.fixture(scope="module")
def qwen2_llm(engine_checkpoint):
    from jaxserve import LLM

    return LLM(str(engine_checkpoint("qwen2")), **ENGINE_KWARGS)
