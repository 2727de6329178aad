"""The engine gives the reference backend's greedy tokens on every other attention backend:
the Pallas kernel (interpreted on CPU) and the native CPU kernel."""

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.testing.hf_reference import random_prompts
from pallas_kernels.cpu import build


@pytest.mark.parametrize("backend", ["pallas", "cpu"])
def test_backend_matches_reference_backend(backend, engine_checkpoint):
    if backend == "cpu" and not build.has_compiler():
        pytest.skip("no C++ compiler ($CXX, g++, c++ or clang++) for the native kernel")
    path = str(engine_checkpoint("llama_hd64"))
    prompts = [{"prompt_token_ids": p} for p in random_prompts([1, 16, 17, 40])]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kwargs = dict(max_num_seqs=8, max_num_batched_tokens=32, progress=False,
                  background_compilation=False)
    tokens = {}
    for name in ("reference", backend):
        llm = LLM(path, attention_backend=name, **kwargs)
        tokens[name] = [o.outputs[0].token_ids for o in
                        llm.generate(prompts, params, use_tqdm=False)]
    assert tokens[backend] == tokens["reference"]
