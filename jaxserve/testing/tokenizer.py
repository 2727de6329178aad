"""A small real byte-level BPE tokenizer, trained at test time, with a chat template.

Test and benchmark checkpoints need text in and text out without any download: this trains
a `tokenizers` BPE on a few paragraphs (ASCII, accented Latin, CJK and emoji, so multi-byte
characters get split across tokens), wraps it as a `PreTrainedTokenizerFast` and saves it.
Vocabularies larger than those paragraphs allow (benchmark models) also train on a
deterministic corpus of pseudo-words made of syllables, sized to the vocabulary.
"""

from __future__ import annotations

import os
import random

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving engine schedules tokens, not phases.
Paged attention stores keys and values in blocks of sixteen tokens; a block table maps each
sequence to its blocks. Continuous batching lets new requests join while others decode.
Prefix caching reuses the blocks of a shared system prompt across many users.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159 2026.
Café, naïve, résumé, façade, jalapeño, Zürich, São Paulo, Ångström.
你好，世界。今天天气很好。我们一起学习机器学习和大语言模型。
こんにちは世界。ありがとうございます。
Emoji: 🙂 🚀 🎉 ❤️ 👍🏽 and symbols like € £ ¥ © ™ → ∑ ∞.
def f(x):\n    return x * 2  # code, with indentation and symbols {}[]()<>=+-*/
"""

# Up to this size the tokenizer trains on _CORPUS alone (the tests' tokenizers stay as they were).
_MAX_VOCAB_WITHOUT_SYNTHETIC = 512
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t",
           "v", "w", "x", "z", "br", "ch", "dr", "fl", "gr", "kr", "pl", "sh", "st", "th", "tr")
_NUCLEI = ("a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "ie", "oo", "ou")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "ng", "st", "ck")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int = 320):
    """Returns a PreTrainedTokenizerFast with `vocab_size` entries (special tokens included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [_CORPUS] * 4
    if vocab_size > _MAX_VOCAB_WITHOUT_SYNTHETIC:
        corpus += _synthetic_corpus(vocab_size)
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(_SPECIAL_TOKENS[1:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _synthetic_corpus(vocab_size: int, seed: int = 0) -> list[str]:
    """Lines of pseudo-words with Zipf-like counts: enough distinct pairs for the merges."""
    rng = random.Random(seed)
    words = set()
    while len(words) < 2 * vocab_size:
        syllables = rng.randint(1, 4)
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                          for _ in range(syllables)))
    ranked = sorted(words)
    rng.shuffle(ranked)
    lines = []
    for rank, word in enumerate(ranked):
        count = max(1, 2000 // (rank + 1))
        lines.append(" ".join([word] * count))
    return lines


def save_tokenizer(model_dir: str | os.PathLike, vocab_size: int = 320):
    """Trains and saves the tokenizer into `model_dir`; returns it."""
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save_pretrained(model_dir)
    return tokenizer


def save_thinking_tokenizer(model_dir: str | os.PathLike, vocab_size: int = 320):
    """Saves a tokenizer whose last two ids are `<think>` and `</think>` (tokens of their
    own, as in Qwen3 and DeepSeek-R1, so that a logit bias can make a random model close
    its think block); returns it."""
    tokenizer = build_tokenizer(vocab_size - 2)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.save_pretrained(model_dir)
    return tokenizer
