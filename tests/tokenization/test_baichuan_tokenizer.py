"""Baichuan's tokenizer from tokenizer.model + tokenizer_config.json, no remote code.

A small SentencePiece BPE model with byte fallback and identity normalization (so texts
round-trip exactly) is trained at test time, with Baichuan's ids (unk 0, bos 1, eos 2), and
saved with a tokenizer_config.json shaped like Baichuan2's, which names the remote
`BaichuanTokenizer` class. `load_tokenizer` must give SentencePiece's own ids (BOS per
`add_bos_token`) and decode back to the text, characters outside the vocabulary included
(byte-fallback pieces), also when decoded incrementally.
"""

import json

import pytest

from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.tokenization.tokenizer_utils import load_tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "serving language models with jax",
          "paged attention over blocks of sixteen tokens", "你好世界", "百川大模型"] * 40
TEXTS = ["the lazy fox serves tokens", "你好，百川！", "mixed 世界 text 🙂 with emoji"]


def _token(content):  # how Baichuan2's tokenizer_config.json writes its special tokens
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": True}


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def baichuan_dir(request, tmp_path_factory):
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("baichuan-tokenizer")
    (path / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(path / "corpus.txt"), model_prefix=str(path / "tokenizer"), vocab_size=320,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, normalization_rule_name="identity", minloglevel=2)
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": request.param, "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
        "bos_token": _token("<s>"), "eos_token": _token("</s>"), "unk_token": _token("<unk>"),
        "pad_token": _token("<unk>"), "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "sp_model_kwargs": {}, "tokenizer_class": "BaichuanTokenizer",
    }))
    return path, request.param


def test_encodes_like_sentencepiece_and_decodes_back(baichuan_dir):
    import sentencepiece as spm

    path, add_bos = baichuan_dir
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    tokenizer = load_tokenizer(path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == [1] * add_bos + sp.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode(TEXTS[1]))  # bytes used


def test_incremental_detokenization_rebuilds_multibyte_characters(baichuan_dir):
    path, _ = baichuan_dir
    tokenizer = load_tokenizer(path)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        detok = IncrementalDetokenizer(tokenizer, [])
        pieces = [detok.add_tokens([i]) for i in ids]
        assert "".join(pieces) + detok.flush() == text
        assert all("\ufffd" not in piece for piece in pieces)


def test_transformers_alone_cannot_load_it(baichuan_dir):
    from transformers import AutoTokenizer

    with pytest.raises((ValueError, OSError)):
        AutoTokenizer.from_pretrained(baichuan_dir[0])
