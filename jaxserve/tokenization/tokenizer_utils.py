"""A model's tokenizer, from the same local path as its weights: HF directory or GGUF file.

HF directories go through `AutoTokenizer` (on a start with a cache directory that has seen the
checkpoint, straight through the class it chose: `resolution_cache`), except Baichuan's, whose tokenizer class is
remote code: `baichuan_tokenizer.py` implements it. A GGUF file carries its vocabulary, merges,
special tokens and chat template as metadata (read by `gguf_file`), which transformers' GGUF
converter turns into a fast tokenizer without torch; the chat template is set from
`tokenizer.chat_template` if transformers left it out. With a cache directory the result is
saved there and later starts load it as an HF tokenizer directory (`resolution_cache`). Any
failure is a ValueError that points at `skip_tokenizer_init`.
"""

from __future__ import annotations

import os


def load_tokenizer(model_path, *, cache_dir: str | None = None):
    """The tokenizer of the checkpoint at `model_path` (directory, `.gguf` file, or a
    directory holding one `.gguf`); `cache_dir` keeps `resolution_cache`'s records."""
    from jaxserve.tokenization.baichuan_tokenizer import is_baichuan_tokenizer, load_baichuan_tokenizer
    from jaxserve.model.loading.gguf_reader import find_gguf_file, gguf_chat_template

    path = os.fspath(model_path)
    try:
        gguf_file = find_gguf_file(path)
        if gguf_file is None and is_baichuan_tokenizer(path):
            return load_baichuan_tokenizer(path)  # remote code in the checkpoint: ours instead
        if gguf_file is None:
            from jaxserve.resolution_cache import resolved_tokenizer

            return resolved_tokenizer(path, cache_dir)
        from jaxserve.resolution_cache import resolved_gguf_tokenizer

        def build():
            tokenizer = _gguf_tokenizer(gguf_file)
            if tokenizer.chat_template is None:
                tokenizer.chat_template = gguf_chat_template(gguf_file)
            return tokenizer

        return resolved_gguf_tokenizer(gguf_file, cache_dir, build)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"no tokenizer could be loaded from {path} ({error!r}); pass "
                         "skip_tokenizer_init=True to serve token ids only") from error


def _gguf_tokenizer(gguf_file: str):
    """The file's tokenizer, built by transformers' GGUF converter from the metadata we parsed.

    Not `AutoTokenizer.from_pretrained(gguf_file=...)`: that parses the file twice more with
    readers that import torch (seconds, and a failure where torch is not installed). Other
    transformers versions, whose converter lives elsewhere, take that path.
    """
    try:
        from transformers import TokenizersBackend
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    except ImportError:
        from transformers import AutoTokenizer

        folder, name = os.path.split(os.path.abspath(gguf_file))
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    from jaxserve.model.loading.gguf_reader import open_gguf

    file = open_gguf(gguf_file)
    tokenizer, config = ({name: file.get(f"tokenizer.{key}") for key, name in renames.items()
                          if f"tokenizer.{key}" in file}
                         for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"],
                                         GGUF_TOKENIZER_MAPPING["tokenizer_config"]))
    if "tokens" not in tokenizer:
        raise ValueError(f"{gguf_file} has no tokenizer.ggml.tokens metadata")
    if tokenizer.get("tokenizer_type") == "llama":  # as transformers: sentencepiece adds BOS
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = file.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(file.get("general.architecture"), tokenizer)
    return TokenizersBackend(tokenizer_object=backend, **config, **extra)
