"""The reasoning parsers on recorded output shapes of their model families, whole and
streamed (every split of the text into deltas, tags cut across deltas included): the
streamed parts add up to the whole split."""

import pytest

from jaxserve.config import REASONING_PARSERS as CONFIG_NAMES
from jaxserve.reasoning import REASONING_PARSERS, ReasoningStream, get_reasoning_parser

R1, QWEN3 = REASONING_PARSERS["deepseek_r1"], REASONING_PARSERS["qwen3"]

CASES = [  # parser, output, (reasoning, content)
    # DeepSeek-R1: the template opened <think>; the output only closes it.
    (R1, "Let me add.\n2 + 2 = 4.\n</think>\n\nThe answer is 4.",
     ("Let me add.\n2 + 2 = 4.\n", "\n\nThe answer is 4.")),
    (R1, "<think>\nHmm.</think>Four.", ("\nHmm.", "Four.")),  # older R1: opens it itself
    (R1, "Still thinking when max_tokens ran out", ("Still thinking when max_tokens ran out", "")),
    (R1, "</think>{\"a\": 1}", ("", "{\"a\": 1}")),
    # Qwen3: only inside the tags; no block, all answer.
    (QWEN3, "<think>\nThe user greets me.\n</think>\n\nHello!",
     ("\nThe user greets me.\n", "\n\nHello!")),
    (QWEN3, "Hello! No thinking here.", ("", "Hello! No thinking here.")),
    (QWEN3, "<think>cut short", ("cut short", "")),
    (QWEN3, "a < b, </think> is no tag here", ("", "a < b, </think> is no tag here")),
    (QWEN3, "<think>x</think>y<think>z</think>", ("x", "y<think>z</think>")),
]


@pytest.mark.parametrize("parser, text, expected", CASES)
def test_split_of_a_whole_output(parser, text, expected):
    assert parser.split(text) == expected


@pytest.mark.parametrize("parser, text, expected", CASES)
@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_streamed_deltas_add_up_to_the_whole_split(parser, text, expected, step):
    stream = ReasoningStream(parser)
    reasoning, content = "", ""
    for end in range(step, len(text) + step, step):
        new_reasoning, new_content = stream.feed(text[:end], final=end >= len(text))
        reasoning, content = reasoning + new_reasoning, content + new_content
    assert (reasoning, content) == expected and stream.content == expected[1]


def test_a_tag_split_across_deltas_is_held_back():
    stream = ReasoningStream(QWEN3)
    assert stream.feed("<thi", final=False) == ("", "")
    assert stream.feed("<think>Hm</th", final=False) == ("Hm", "")
    assert stream.feed("<think>Hm</think>ok", final=False) == ("", "ok")


def test_a_prompt_that_closed_the_think_block_leaves_all_answer():
    prompt = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert QWEN3.ended_in(prompt) and R1.ended_in(prompt)
    assert not R1.ended_in("<|im_start|>assistant\n<think>\n")
    stream = ReasoningStream(R1, ended_in_prompt=True)
    assert stream.feed("no tags: the answer", final=True) == ("", "no tags: the answer")


def test_names_agree_with_the_config_and_unknown_ones_are_refused():
    assert sorted(CONFIG_NAMES) == sorted(REASONING_PARSERS)
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        get_reasoning_parser("granite")
