"""A model's tokenizer, from the same local path as its weights: HF directory or GGUF file.

HF directories go through `AutoTokenizer`, except Baichuan's, whose tokenizer class is
remote code: `baichuan_tokenizer.py` implements it. A GGUF file carries its vocabulary, merges,
special tokens and chat template as metadata, which transformers turns into a fast tokenizer;
the chat template is set from `tokenizer.chat_template` if transformers left it out. Any
failure is a ValueError that points at `skip_tokenizer_init`.
"""

from __future__ import annotations

import os


def load_tokenizer(model_path):
    """The tokenizer of the checkpoint at `model_path` (directory, `.gguf` file, or a
    directory holding one `.gguf`)."""
    from transformers import AutoTokenizer

    from jaxserve.baichuan_tokenizer import is_baichuan_tokenizer, load_baichuan_tokenizer
    from jaxserve.model.gguf_reader import find_gguf_file, gguf_chat_template

    path = os.fspath(model_path)
    try:
        gguf_file = find_gguf_file(path)
        if gguf_file is None and is_baichuan_tokenizer(path):
            return load_baichuan_tokenizer(path)  # remote code in the checkpoint: ours instead
        if gguf_file is None:
            return AutoTokenizer.from_pretrained(path)
        folder, name = os.path.split(os.path.abspath(gguf_file))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = gguf_chat_template(gguf_file)
        return tokenizer
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"no tokenizer could be loaded from {path} ({error!r}); pass "
                         "skip_tokenizer_init=True to serve token ids only") from error
