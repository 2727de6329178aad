"""The engine gives the reference backend's greedy tokens on every other attention backend:
the Pallas kernel (interpreted on CPU) and the native CPU kernel."""

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.testing.hf_reference import random_prompts
from pallas_kernels.cpu import build

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
# One (T, B) bucket: the 17- and 40-token prompts prefill in 16-token chunks.
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=16, progress=False,
              background_compilation=False)


def _tokens(path: str, backend: str) -> list[list[int]]:
    prompts = [{"prompt_token_ids": p} for p in random_prompts([1, 16, 17, 40])]
    llm = LLM(path, attention_backend=backend, **ENGINE)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference_tokens(engine_checkpoint):
    """The reference backend's tokens, computed once for both backends."""
    return _tokens(str(engine_checkpoint("llama_hd64")), "reference")


@pytest.mark.parametrize("backend", ["pallas", "cpu"])
def test_backend_matches_reference_backend(backend, engine_checkpoint, reference_tokens):
    if backend == "cpu" and not build.has_compiler():
        pytest.skip("no C++ compiler ($CXX, g++, c++ or clang++) for the native kernel")
    assert _tokens(str(engine_checkpoint("llama_hd64")), backend) == reference_tokens
