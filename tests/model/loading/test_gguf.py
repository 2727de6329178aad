"""GGUF checkpoints, written here from tiny HF checkpoints the way llama.cpp converts them.

`_write_gguf` uses llama.cpp's tensor names, permutes Q/K rows for Llama, writes no LM head
when tied, llama3 RoPE as `rope_freqs.weight`, the tokenizer as metadata, F32 or Q8_0. Loading
it back must give the checkpoint's own parameters, config and tokens, and HF's logits.
"""

import dataclasses
import json
import os
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxserve.config import ModelConfig
from jaxserve.model.loading import gguf_reader
from jaxserve.model.loading.gguf_reader import (GGUFCheckpointReader, find_gguf_file,
                                       llama3_rope_from_factors)
from jaxserve.model.layers import rope_frequencies
from jaxserve.model.loading.loader import load_model
from jaxserve.testing.engine_step import engine_step
from jaxserve.tokenization.tokenizer_utils import load_tokenizer
from pallas_kernels.ragged_paged_attention import kv_pool_shape

F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
# llama3 RoPE (as rope_freqs.weight) | tied, biases, head_dim 48, GQA 2:1 | yarn, q/k/v biases,
# not permuted | q/k norms, not permuted | untied, default RoPE
FAMILIES = ("llama", "llama_head_dim", "qwen2", "qwen3", "llama_hd64")
# llama.cpp's names for the tensors of one decoder layer, and for the others.
_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_PROMPT = np.random.default_rng(0).integers(3, 256, 40).astype(np.int32)


def _gguf_name(hf_name: str) -> str:
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    return _GLOBAL_NAMES.get(hf_name) or f"blk.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"


def _llama_cpp_permute(rows: np.ndarray,  # [heads * H, ...] with HF's rotate_half halves
                       num_heads: int) -> np.ndarray:  # [heads * H, ...] with pairs interleaved
    half = rows.shape[0] // num_heads // 2
    return rows.reshape(num_heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _llama_cpp_rope_factors(rope: dict, head_dim: int) -> np.ndarray:  # [H/2] float32
    """The `rope_freqs.weight` llama.cpp writes for llama3 RoPE: each frequency's divisor."""
    wavelength = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len, factor = rope["original_max_position_embeddings"], rope["factor"]
    smooth = (old_len / wavelength - low) / (high - low)
    factors = np.where(wavelength < old_len / high, 1.0,
                       np.where(wavelength > old_len / low, factor,
                                1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _write_gguf(hf_dir, target, *, qtype=F32, skip=(), extra=None) -> str:
    """`hf_dir` converted to a GGUF at `target`; `skip` drops tensors, `extra` adds some."""
    config = json.loads((hf_dir / "config.json").read_text())
    arch, heads, kv_heads = (config[k] for k in ("model_type", "num_attention_heads",
                                                  "num_key_value_heads"))
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(target, arch)
    rope = config["rope_parameters"]
    for add, value in ((writer.add_context_length, config["max_position_embeddings"]),
                       (writer.add_embedding_length, config["hidden_size"]),
                       (writer.add_block_count, config["num_hidden_layers"]),
                       (writer.add_feed_forward_length, config["intermediate_size"]),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, kv_heads),
                       (writer.add_key_length, head_dim), (writer.add_value_length, head_dim),
                       (writer.add_rope_dimension_count, head_dim),
                       (writer.add_layer_norm_rms_eps, config["rms_norm_eps"]),
                       (writer.add_rope_freq_base, rope["rope_theta"]),
                       (writer.add_bos_token_id, config["bos_token_id"]),
                       (writer.add_eos_token_id, config["eos_token_id"])):
        if value is not None:
            add(value)
    extra = dict(extra or {})
    if rope["rope_type"] == "llama3":
        extra["rope_freqs.weight"] = _llama_cpp_rope_factors(rope, head_dim)
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if (hf_dir / "tokenizer.json").exists():
        _add_tokenizer(writer, hf_dir)
    tensors = {_gguf_name(name): value
               for name, value in load_file(hf_dir / "model.safetensors").items()}
    for name, value in {**tensors, **extra}.items():
        if name in skip:
            continue
        if arch == "llama" and ".attn_q." in name:
            value = _llama_cpp_permute(value, heads)
        elif arch == "llama" and ".attn_k." in name:
            value = _llama_cpp_permute(value, kv_heads)
        if qtype != F32 and value.ndim == 2:  # norms and biases stay F32, as in llama.cpp
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, value)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file,
                  writer.write_tensors_to_file, writer.close):
        write()
    return str(target)


def _add_tokenizer(writer: gguf.GGUFWriter, hf_dir) -> None:
    """The checkpoint's byte-level BPE tokenizer as llama.cpp stores one ("gpt2")."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    writer.add_token_types([3 if i in tokenizer.all_special_ids else 1
                            for i in range(len(tokenizer))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint, tmp_path_factory):
    """`tiny_gguf(family, qtype=F32, with_tokenizer=False) -> path of the .gguf`."""
    built = {}

    def get(family: str, qtype=F32, with_tokenizer: bool = False) -> str:
        if (family, qtype, with_tokenizer) not in built:
            built[family, qtype, with_tokenizer] = _write_gguf(
                tiny_checkpoint(family, with_tokenizer=with_tokenizer),
                tmp_path_factory.mktemp("gguf") / f"{family}-{qtype.name}.gguf", qtype=qtype)
        return built[family, qtype, with_tokenizer]

    return get


def _logits(path, paged_step) -> np.ndarray:  # [len(_PROMPT), V]: one prefill, paged
    config = ModelConfig.from_pretrained(path, dtype="float32")
    model = load_model(config.model_dir, config)
    shape = kv_pool_shape(config.num_kv_heads, 8, 16, config.head_dim)
    pools = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(config.num_layers))
    ids, positions, metadata = paged_step([_PROMPT], [0], [[1, 2, 3]], block_size=16,
                                          num_tokens=64, num_seqs=8, max_blocks=4)
    with jax.default_matmul_precision("highest"):
        logits, _ = engine_step(model, all_token_logits=True)(pools, ids, positions, metadata)
    return np.asarray(logits)[:len(_PROMPT)]


def _hf_logits(hf_dir, edit=lambda name, value: value) -> np.ndarray:  # [len(_PROMPT), V]
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(edit(name, param.numpy())))
        return model(torch.from_numpy(_PROMPT[None].astype(np.int64))).logits[0].numpy()


def test_a_gguf_path_is_the_file_or_a_directory_holding_one(tiny_gguf, tiny_checkpoint):
    path = tiny_gguf("llama_head_dim")
    assert find_gguf_file(path) == path
    assert find_gguf_file(os.path.dirname(path)) == path
    assert find_gguf_file(tiny_checkpoint("llama_head_dim")) is None  # config.json: HF layout
    config = ModelConfig.from_pretrained(os.path.dirname(path), dtype="float32")
    assert config == ModelConfig.from_pretrained(path, dtype="float32") and config.model_dir == path


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_config_equals_the_config_of_the_checkpoint_it_came_from(family, tiny_gguf,
                                                                       tiny_checkpoint):
    from_gguf = ModelConfig.from_pretrained(tiny_gguf(family), dtype="float32")
    from_hf = ModelConfig.from_pretrained(tiny_checkpoint(family), dtype="float32")
    assert from_gguf.rms_norm_eps == pytest.approx(from_hf.rms_norm_eps, rel=1e-7)  # a float32
    assert _rope(from_gguf) == pytest.approx(_rope(from_hf), rel=1e-6)
    assert dataclasses.replace(from_gguf, model_dir=from_hf.model_dir, rope_scaling=None,
                               rms_norm_eps=from_hf.rms_norm_eps) == dataclasses.replace(
                                   from_hf, rope_scaling=None)


def _rope(config: ModelConfig) -> list[float]:  # the inverse frequencies and attention factor
    inv_freq, attention_factor = rope_frequencies(config.head_dim, config.rope_theta,
                                                  tuple((config.rope_scaling or {}).items()))
    return [*inv_freq.tolist(), attention_factor]


# (head_dim, rope_theta, factor, low, high, original): Llama 3.1 8B, Llama 3.2 1B, a rule
# with low_freq_factor 2, and one where a single frequency lies between kept and scaled.
@pytest.mark.parametrize("rope", [(128, 5e5, 8.0, 1.0, 4.0, 8192), (64, 5e5, 32.0, 1.0, 4.0, 8192),
                                  (64, 1e4, 4.0, 2.0, 8.0, 4096), (16, 1e4, 8.0, 1.0, 4.0, 32)])
def test_llama3_rope_is_recovered_from_llama_cpp_frequency_factors(rope):
    head_dim, theta, factor, low, high, original = rope
    params = dict(rope_type="llama3", rope_theta=theta, factor=factor, low_freq_factor=low,
                  high_freq_factor=high, original_max_position_embeddings=original)
    recovered = llama3_rope_from_factors(_llama_cpp_rope_factors(params, head_dim), theta,
                                         head_dim)
    del params["rope_theta"], recovered["rope_theta"]
    expected, _ = rope_frequencies(head_dim, theta, tuple(params.items()))
    actual, _ = rope_frequencies(head_dim, theta, tuple(recovered.items()))
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_frequency_factors_that_follow_no_llama3_rule_are_rejected():
    factors = np.linspace(1.0, 2.0, 32)[::-1]  # the slowest frequency kept, the fastest scaled
    with pytest.raises(ValueError, match="do not follow Llama 3's rule"):
        llama3_rope_from_factors(factors, 1e4, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_loads_exactly_the_params_of_the_checkpoint(family, tiny_gguf, tiny_checkpoint):
    def params(path):
        config = ModelConfig.from_pretrained(path, dtype="float32")
        return nnx.state(load_model(config.model_dir, config))

    jax.tree.map(np.testing.assert_array_equal, params(tiny_gguf(family)),
                 params(tiny_checkpoint(family)))


@pytest.mark.parametrize("family", ["llama", "llama_head_dim"])
def test_f32_gguf_logits_match_transformers(family, tiny_gguf, tiny_checkpoint, paged_step):
    expected = _hf_logits(tiny_checkpoint(family))
    assert np.abs(_logits(tiny_gguf(family), paged_step) - expected).max() < 1e-4


def test_q8_0_gguf_logits_match_transformers_on_the_dequantized_weights(
        tiny_gguf, tiny_checkpoint, paged_step):
    path = tiny_gguf("llama_head_dim", Q8_0)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == Q8_0 and types["token_embd.weight"] == Q8_0

    def quantized(name, value):  # what llama.cpp's Q8_0 keeps of a weight matrix
        return (gguf.quants.dequantize(gguf.quants.quantize(value, Q8_0), Q8_0)
                if value.ndim == 2 else value)

    hf_dir = tiny_checkpoint("llama_head_dim")
    expected = _hf_logits(hf_dir, quantized)
    assert np.abs(expected - _hf_logits(hf_dir)).max() > 1e-3  # quantization shows
    assert np.abs(_logits(path, paged_step) - expected).max() < 1e-4


def test_reader_maps_hf_names_and_names_the_tensors_it_lacks_or_cannot_read(tiny_gguf,
                                                                            monkeypatch):
    reader = GGUFCheckpointReader(tiny_gguf("llama_head_dim"))
    assert "model.layers.1.self_attn.k_proj.bias" in reader
    assert "model.layers.2.mlp.up_proj.weight" not in reader
    np.testing.assert_array_equal(reader.get("lm_head.weight"),  # tied: the embedding
                                  reader.get("model.embed_tokens.weight"))
    with pytest.raises(KeyError, match=r"'model.layers.2.mlp.up_proj.weight' is not in the GGUF"):
        reader.get("model.layers.2.mlp.up_proj.weight")

    def refuse(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(ValueError, match=r"GGUF tensor 'blk.0.ffn_down.weight' \(for "
                                         r"'model.layers.0.mlp.down_proj.weight'\) is stored "
                                         r"as F32, which gguf cannot dequantize"):
        reader.get("model.layers.0.mlp.down_proj.weight")


def test_missing_gguf_tensor_is_named_with_its_expected_shape(tiny_checkpoint, tmp_path):
    path = _write_gguf(tiny_checkpoint("llama_hd64"), tmp_path / "m.gguf",
                       skip=("blk.1.ffn_up.weight",))
    config = ModelConfig.from_pretrained(path, dtype="float32")
    with pytest.raises(ValueError, match=r"has no tensor 'model.layers.1.mlp.up_proj.weight' "
                                         r"\(the model expects shape \(128, 64\)\)"):
        load_model(path, config)


def test_tokenizer_chat_template_and_eos_come_from_the_gguf_metadata(tiny_gguf, tiny_checkpoint):
    path = tiny_gguf("llama_head_dim", with_tokenizer=True)
    hf_tokenizer = load_tokenizer(tiny_checkpoint("llama_head_dim", with_tokenizer=True))
    tokenizer = load_tokenizer(path)
    text = "Héllo wörld, 東京 🚀 def f(x):\n    return x * 2<|im_end|>"
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert tokenizer.chat_template == hf_tokenizer.chat_template
    chat = dict(conversation=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.apply_chat_template(**chat) == hf_tokenizer.apply_chat_template(**chat)
    config = ModelConfig.from_pretrained(path, dtype="float32")
    assert config.eos_token_ids == (hf_tokenizer.eos_token_id,) == (tokenizer.eos_token_id,)


def test_a_gguf_tokenizer_is_saved_once_and_loads_back_equal(tiny_gguf, tmp_path, monkeypatch):
    """With a cache directory the built tokenizer is kept as an HF tokenizer directory; the
    next start loads that instead of converting the metadata again."""
    from jaxserve.tokenization import tokenizer_utils

    path, cache = tiny_gguf("qwen2", with_tokenizer=True), str(tmp_path / "cache")
    built = load_tokenizer(path, cache_dir=cache)
    folders = [n for n in os.listdir(os.path.join(cache, "jaxserve-resolved"))
               if n.endswith(".tokenizer")]
    assert len(folders) == 1
    monkeypatch.setattr(tokenizer_utils, "_gguf_tokenizer", lambda f: 1 / 0)  # not rebuilt
    loaded = load_tokenizer(path, cache_dir=cache)
    chat = dict(conversation=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert loaded.apply_chat_template(**chat) == built.apply_chat_template(**chat)
    text = "Héllo wörld 🚀 <|im_end|>"
    assert loaded.encode(text) == built.encode(text)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, len(loaded)) == (
        built.bos_token, built.eos_token, built.pad_token, len(built))
    monkeypatch.undo()
    tokenizer_json = os.path.join(cache, "jaxserve-resolved", folders[0], "tokenizer.json")
    with open(tokenizer_json, "w") as f:
        f.write("{damaged")
    assert load_tokenizer(path, cache_dir=cache).encode(text) == built.encode(text)  # rebuilt
    with open(tokenizer_json) as f:
        assert json.load(f)["model"]  # and saved again


def test_gguf_without_tokenizer_asks_for_skip_tokenizer_init(tiny_gguf):
    with pytest.raises(ValueError, match="skip_tokenizer_init=True"):
        load_tokenizer(tiny_gguf("llama_hd64"))


def test_config_tokenizer_and_weights_parse_the_file_once(tiny_gguf, monkeypatch):
    path = tiny_gguf("qwen2", with_tokenizer=True)
    parses = []
    real = gguf_reader.GGUFFile
    monkeypatch.setattr(gguf_reader, "GGUFFile", lambda *a, **k: parses.append(a) or real(*a, **k))
    gguf_reader._parse.cache_clear()
    gguf_reader.gguf_hf_config(path)
    gguf_reader.gguf_chat_template(path)
    gguf_reader.GGUFCheckpointReader(path)
    assert len(parses) == 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tokenizer_equals_the_one_autotokenizer_builds_from_the_file(tiny_gguf, family):
    """Ours is built from our parse of the metadata (no torch, no second parse)."""
    from transformers import AutoTokenizer

    path = tiny_gguf(family, with_tokenizer=True)
    folder, name = os.path.split(path)
    ours, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(folder, gguf_file=name)
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == auto.apply_chat_template(
        chat, tokenize=False)
    for text in ("Hello world!", "  two spaces\nand\ttabs", "caf\u00e9 \U0001f916 ok"):
        assert ours(text).input_ids == auto(text).input_ids
        assert ours.decode(ours(text).input_ids) == auto.decode(auto(text).input_ids)
    assert (ours.bos_token, ours.eos_token, len(ours)) == (auto.bos_token, auto.eos_token,
                                                           len(auto))


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_0,
                                   gguf.GGMLQuantizationType.Q4_1, Q8_0], ids=lambda t: t.name)
def test_a_quantized_gguf_stays_quantized_and_none_dequantizes_it(tiny_gguf, qtype):
    from jaxserve.model.quantization import QuantizedWeight

    path = tiny_gguf("llama", qtype)  # llama: Q/K rows permuted in the file
    config = ModelConfig.from_pretrained(path, dtype="float32")
    kept = load_model(path, config)
    dense = load_model(path, dataclasses.replace(config, quantization="none"))
    attn, dense_attn = kept.layers[0].self_attn, dense.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        weight = getattr(attn, name).kernel[...]
        assert isinstance(weight, QuantizedWeight)
        assert weight.bits == (8 if qtype == Q8_0 else 4) and weight.group_size == 32
        np.testing.assert_array_equal(weight.dequantize(), getattr(dense_attn, name).kernel[...])
    assert isinstance(kept.layers[1].mlp.down_proj.kernel[...], QuantizedWeight)
    assert not isinstance(dense.layers[1].mlp.down_proj.kernel[...], QuantizedWeight)
    table = kept.embed_tokens.embedding[...]  # the stored [V, D] table kept as [D, V]
    assert isinstance(table, QuantizedWeight) and table.shape == (config.hidden_size,
                                                                   config.vocab_size)
    np.testing.assert_array_equal(table.dequantize().T, dense.embed_tokens.embedding[...])
