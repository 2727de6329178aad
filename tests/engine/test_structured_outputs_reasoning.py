"""Structured outputs under a reasoning parser, through the whole engine: the grammar starts
after the output's end-of-think tokens. The tiny checkpoint's tokenizer has `<think>` and
`</think>` as tokens of their own (tests/conftest.py's thinking_llm), so a logit bias can
make the random model close its think block at once; the grammar then has to shape the
answer."""

import re

from jaxserve import SamplingParams, StructuredOutputsParams

REGEX = "[ab]{3}-[0-9]{2}"


def _params(**kwargs):
    return SamplingParams(temperature=0.0, max_tokens=16,
                          structured_outputs=StructuredOutputsParams(regex=REGEX), **kwargs)


def _end_id(llm):
    return llm.get_tokenizer().convert_tokens_to_ids("</think>")


def test_the_grammar_shapes_the_answer_after_the_think_block(thinking_llm):
    end = _end_id(thinking_llm)
    # The bias makes the first token </think> (no mask yet); after it the grammar rules
    # and masks </think> out, however biased.
    [output] = thinking_llm.generate("Hello", _params(logit_bias={end: 100.0}), use_tqdm=False)
    sample = output.outputs[0]
    assert sample.token_ids[0] == end
    assert sample.text.startswith("</think>")
    assert re.fullmatch(REGEX, sample.text[len("</think>"):]), sample.text
    assert sample.finish_reason == "stop"


def test_no_grammar_while_the_model_reasons(thinking_llm):
    """Greedy without the think block closing: the constrained output is the free one."""
    free = thinking_llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=16),
                                 use_tqdm=False)[0].outputs[0]
    assert _end_id(thinking_llm) not in free.token_ids
    constrained = thinking_llm.generate("Hello", _params(), use_tqdm=False)[0].outputs[0]
    assert constrained.token_ids == free.token_ids and not re.fullmatch(REGEX, free.text)


def test_a_prompt_that_closes_the_think_block_constrains_at_once(thinking_llm):
    [output] = thinking_llm.generate("Hello<think>\n\n</think>\n\n", _params(), use_tqdm=False)
    assert re.fullmatch(REGEX, output.outputs[0].text), output.outputs[0].text
