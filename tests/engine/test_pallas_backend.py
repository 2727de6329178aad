"""The engine on the Pallas kernel (interpreted on CPU) gives the reference's greedy tokens."""

from jaxserve import LLM, SamplingParams
from jaxserve.testing.hf_reference import random_prompts


def test_pallas_backend_matches_reference_backend(engine_checkpoint):
    path = str(engine_checkpoint("llama_hd64"))
    prompts = [{"prompt_token_ids": p} for p in random_prompts([1, 16, 17, 40])]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kwargs = dict(max_num_seqs=8, max_num_batched_tokens=32, progress=False)
    tokens = {}
    for backend in ("reference", "pallas"):
        llm = LLM(path, attention_backend=backend, **kwargs)
        tokens[backend] = [o.outputs[0].token_ids for o in
                           llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["pallas"] == tokens["reference"]
