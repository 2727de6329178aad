"""The incremental detokenizer: exact text, UTF-8 safety, stop strings, hold-back."""

import pytest

from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.testing.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _stream(tokenizer, text, prompt="Hello", one_by_one=True, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), **kwargs)
    ids = tokenizer.encode(text)
    deltas = [detok.add_tokens([i]) for i in ids] if one_by_one else [detok.add_tokens(ids)]
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("text", ["The quick brown fox.", "你好，世界。🙂🚀", "Café naïve € → ∞"])
def test_streamed_deltas_join_to_the_full_decode(tokenizer, text):
    deltas, detok = _stream(tokenizer, text)
    assert "".join(deltas) == tokenizer.decode(tokenizer.encode(text)) == detok.output_text


def test_multibyte_characters_split_across_tokens_are_never_emitted_broken(tokenizer):
    deltas, _ = _stream(tokenizer, "你好🙂世界")
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "你好🙂世界"


def test_special_tokens_are_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("hi") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    skip = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert skip.add_tokens(ids) + skip.flush() == "hi"
    assert keep.add_tokens(ids) + keep.flush() == "hi<|im_end|>"


def test_stop_string_trims_output_and_reports_the_string(tokenizer):
    deltas, detok = _stream(tokenizer, "Paged attention stores keys", stop=("stores",))
    assert detok.stop_string == "stores"
    assert "".join(deltas) == detok.output_text == "Paged attention "


def test_stop_string_included_when_asked(tokenizer):
    _, detok = _stream(tokenizer, "Paged attention stores keys", stop=("stores",),
                       include_stop_str_in_output=True)
    assert detok.output_text == "Paged attention stores"


def test_stop_string_split_across_tokens_is_found_and_never_streamed(tokenizer):
    text = "The quick brown fox jumps"
    stop = "k bro"  # spans the token boundary between "quick" and "brown"
    ids = tokenizer.encode(text)
    assert not any(stop in tokenizer.decode([i]) for i in ids)
    deltas, detok = _stream(tokenizer, text, stop=(stop,))
    assert detok.stop_string == stop
    assert "".join(deltas) == "The quic"
    assert all(stop[:2] not in d for d in deltas[:-1])


def test_earliest_of_several_stop_strings_wins(tokenizer):
    _, detok = _stream(tokenizer, "Hello, world! How are you", stop=("How", "world"),
                       one_by_one=False)
    assert detok.stop_string == "world" and detok.output_text == "Hello, "


def test_a_prompt_ending_inside_a_character_leaks_none_of_its_bytes(tokenizer):
    ids = tokenizer.encode("ab🙂🚀cd")
    cut = next(i for i in range(1, len(ids))
               if "\ufffd" in tokenizer.decode(ids[:i]))  # the prompt stops mid-emoji
    detok = IncrementalDetokenizer(tokenizer, ids[:cut])
    text = "".join(detok.add_tokens([i]) for i in ids[cut:]) + detok.flush()
    # The emoji begun in the prompt is the prompt's: neither it nor its bytes are emitted.
    assert text == detok.output_text == "🚀cd"
