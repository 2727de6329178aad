"""The offline LLM API: inputs it accepts, errors it raises, order of outputs, chat."""

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.testing.hf_reference import random_prompts


def test_outputs_come_back_in_input_order_with_prompts(qwen2_llm):
    tokenizer = qwen2_llm.get_tokenizer()
    prompts = ["Hello, world!", {"prompt_token_ids": [5, 6, 7]}, "Paged attention"]
    outs = qwen2_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3),
                              use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello, world!", None, "Paged attention"]
    assert outs[0].prompt_token_ids == tokenizer.encode("Hello, world!")
    assert outs[1].prompt_token_ids == [5, 6, 7]


def test_one_params_per_prompt_or_one_for_all(qwen2_llm):
    prompts = [{"prompt_token_ids": p} for p in random_prompts([4, 9])]
    outs = qwen2_llm.generate(prompts, [SamplingParams(max_tokens=2, ignore_eos=True),
                                        SamplingParams(max_tokens=4, ignore_eos=True)],
                              use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 4]
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        qwen2_llm.generate(prompts, [SamplingParams()], use_tqdm=False)


def test_chat_applies_the_template(qwen2_llm):
    out = qwen2_llm.chat([{"role": "user", "content": "hi"}],
                         SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    assert out.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert 1 <= len(out.outputs[0].token_ids) <= 4


@pytest.mark.parametrize("prompt,message", [
    ({"prompt_token_ids": []}, "prompt must not be empty"),
    ({"prompt_token_ids": [1, 320]}, r"prompt_token_ids must be in \[0, 320\)"),
    ({"prompt_token_ids": [1] * 512}, "max_model_len=512"),
])
def test_bad_prompts_raise_value_errors_and_leave_the_engine_usable(qwen2_llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        qwen2_llm.generate([{"prompt_token_ids": [3, 4]}, prompt], use_tqdm=False)
    assert not qwen2_llm.llm_engine.has_unfinished_requests()
    assert qwen2_llm.generate({"prompt_token_ids": [3, 4]}, SamplingParams(max_tokens=2),
                              use_tqdm=False)[0].finished


def test_a_prompt_one_token_short_of_max_model_len_gets_its_one_token(qwen2_llm):
    out = qwen2_llm.generate({"prompt_token_ids": [1] * 511}, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"


def test_unknown_keyword_is_a_type_error(engine_checkpoint):
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM(str(engine_checkpoint("qwen2")), max_num_sequences=4)


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(block_size=12), "block_size"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(max_model_len=100000), "max_model_len"), (dict(dtype="int8"), "dtype"),
    (dict(attention_backend="flash"), "attention_backend"),
])
def test_invalid_values_name_the_parameter(engine_checkpoint, kwargs, name):
    with pytest.raises(ValueError, match=name):
        LLM(str(engine_checkpoint("qwen2")), progress=False, **kwargs)


def test_skip_tokenizer_init_serves_token_ids(engine_checkpoint, engine_kwargs, qwen2_llm):
    # qwen2_llm's checkpoint and budgets (its programs come from the compilation cache); its
    # tokenizer is never loaded (the tests in tests/parallel run checkpoints that have none)
    llm = LLM(str(engine_checkpoint("qwen2")), skip_tokenizer_init=True, **engine_kwargs)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]},
                       SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                      detokenize=False), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="need a tokenizer"):
        llm.generate("text", use_tqdm=False)


def test_a_directory_without_tokenizer_asks_for_skip_tokenizer_init(tiny_checkpoint):
    with pytest.raises(ValueError, match="skip_tokenizer_init=True"):
        LLM(str(tiny_checkpoint("llama")), progress=False)


def test_numpy_token_ids_are_accepted(qwen2_llm):
    import numpy as np

    ids = np.array([5, 6, 7], dtype=np.int64)
    out = qwen2_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2),
                             use_tqdm=False)[0]
    assert out.prompt_token_ids == [5, 6, 7] and out.finished
