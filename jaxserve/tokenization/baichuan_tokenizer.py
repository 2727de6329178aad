"""Baichuan's SentencePiece tokenizer, without running the checkpoint's remote code.

Baichuan and Baichuan2 checkpoints ship `tokenizer.model` (SentencePiece, byte fallback)
and a `tokenizer_config.json` naming `BaichuanTokenizer`, a class that only exists as
remote code. This is the same tokenizer written here: text -> SentencePiece pieces, BOS/EOS
added per `add_bos_token` / `add_eos_token`, and ids -> text through SentencePiece's own
decoder (so byte-fallback pieces such as `<0xE4>` become UTF-8 again), with special tokens
kept inline.
"""

from __future__ import annotations

import json
import os

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

TOKENIZER_CLASS = "BaichuanTokenizer"


class BaichuanTokenizer(SentencePieceBackend):
    """A `transformers` slow tokenizer over Baichuan's `tokenizer.model`."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, *, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                 pad_token=None, add_bos_token: bool = True, add_eos_token: bool = False,
                 clean_up_tokenization_spaces: bool = False, **kwargs):
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        kwargs.pop("auto_map", None)
        kwargs.pop("tokenizer_class", None)
        super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token,
                         eos_token=eos_token, pad_token=pad_token, legacy=True,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + list(token_ids_0) + eos
        return out if token_ids_1 is None else out + bos + list(token_ids_1) + eos

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece decodes runs of ordinary pieces; special tokens stay as written."""
        specials = set(self.all_special_tokens)
        out, run = [], []
        for token in tokens:
            if token in specials:
                out.append(self.sp_model.decode(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode(run))
        return "".join(out)


def is_baichuan_tokenizer(path: str) -> bool:
    """Whether the directory's tokenizer_config.json names Baichuan's remote tokenizer."""
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config) or not os.path.isfile(os.path.join(path, "tokenizer.model")):
        return False
    with open(config) as f:
        return json.load(f).get("tokenizer_class") == TOKENIZER_CLASS


def load_baichuan_tokenizer(path: str) -> BaichuanTokenizer:
    """The tokenizer of a Baichuan checkpoint directory, its config's options applied."""
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        options = json.load(f)
    for key in ("auto_map", "tokenizer_class", "sp_model_kwargs"):
        options.pop(key, None)
    for key, value in options.items():  # {"__type": "AddedToken", "content": "<s>", ...}
        if isinstance(value, dict) and "content" in value:
            options[key] = value["content"]
    return BaichuanTokenizer(os.path.join(path, "tokenizer.model"), **options)
