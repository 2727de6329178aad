"""GGUF checkpoints (llama.cpp's one-file format) read as if they were HF safetensors.

`find_gguf_file(path)` says whether a model path is a GGUF: a `.gguf` file, or a directory
holding exactly one and no config.json. `gguf_hf_config(file)` rebuilds the transformers
config from the file's metadata. `GGUFCheckpointReader` serves tensors by HF name, memory-mapped
and dequantized to float32 one tensor at a time, with llama.cpp's Q/K row permutation undone.
All three share one parse per file and process (`open_gguf`, a `gguf_file.GGUFFile`).
"""

from __future__ import annotations

import functools
import os

import gguf
import numpy as np

from jaxserve.model.loading.gguf_file import GGUFFile
from jaxserve.model.loading.gguf_quant import repack
from jaxserve.model.quantization import QuantizedWeight

# llama.cpp permutes the rows of Q and K (per head: interleaved rotary pairs instead of
# halves) when it converts these architectures; Qwen2/Qwen3 files keep HF's order.
_PERMUTED_ARCHITECTURES = ("llama",)
_ROPE_SCALING_TYPES = ("none", "linear", "yarn")
# Optional `{arch}.rope.scaling.*` keys -> transformers' rope_parameters keys (yarn).
_YARN_KEYS = (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"))


def open_gguf(gguf_file) -> GGUFFile:
    """The parsed, memory-mapped file; parsed again only when the file changes."""
    path = os.path.realpath(os.fspath(gguf_file))
    stat = os.stat(path)
    return _parse(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parse(path: str, size: int, mtime_ns: int) -> GGUFFile:
    del size, mtime_ns  # part of the cache key only
    return GGUFFile(path)


def find_gguf_file(path) -> str | None:
    """The GGUF file `path` names, or None for anything else (an HF directory, say).

    A directory is a GGUF checkpoint when it has no config.json and holds `.gguf` files;
    more than one is an error, since nothing says which to serve.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    names = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
    if len(names) > 1:
        raise ValueError(f"{path} holds {len(names)} .gguf files ({', '.join(names)}); "
                         "pass the path of the one to serve")
    return os.path.join(path, names[0]) if names else None


def gguf_hf_config(gguf_file: str):
    """The transformers config (`AutoConfig.for_model`) that the file's metadata describes.

    Beside the shapes it sets `architectures` (from the architecture name), tied embeddings
    (no `output.weight`), biases (from the tensors present), RoPE (plain, linear, yarn, or
    llama3 recovered from a `rope_freqs.weight` tensor) and the EOS ids (`eos`, then
    `eot`/`eom`, the end-of-turn tokens of chat models).
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    reader = open_gguf(gguf_file)
    arch = _value(reader, "general.architecture")
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(arch)
    if architecture is None:
        raise ValueError(f"{gguf_file}: GGUF architecture {arch!r} names no transformers "
                         "causal LM")
    names = reader.tensors  # GGUF name -> tensor
    if "token_embd.weight" not in names:
        raise ValueError(f"{gguf_file}: no token embedding tensor 'token_embd.weight'")
    key = lambda name, default=None: _value(reader, f"{arch}.{name}", default)  # noqa: E731
    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise ValueError(f"{gguf_file}: per-layer head counts are not supported")
    head_dim = key("attention.key_length") or hidden // heads
    rotary_dim = key("rope.dimension_count") or head_dim
    window = key("attention.sliding_window")
    eos_ids = [_value(reader, f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
    fields = dict(
        architectures=[architecture],
        vocab_size=int(names["token_embd.weight"].shape[-1]),  # ggml shape [D, V]
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        max_position_embeddings=key("context_length"),
        rope_parameters=_rope_parameters(gguf_file, key, rotary_dim,
                                         names.get("rope_freqs.weight")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        sliding_window=window,
        use_sliding_window=window is not None,
        bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
        pad_token_id=_value(reader, "tokenizer.ggml.padding_token_id"),
    )
    if rotary_dim != head_dim:  # ModelConfig rejects partial rotary with its own message
        fields["partial_rotary_factor"] = rotary_dim / head_dim
    return transformers.AutoConfig.for_model(arch, **fields)


def gguf_chat_template(gguf_file: str) -> str | None:
    """The chat template in the file's metadata (`tokenizer.chat_template`), if any."""
    return _value(open_gguf(gguf_file), "tokenizer.chat_template")


class GGUFCheckpointReader:
    """HF tensor name -> float numpy array, over the tensors of one GGUF file.

    The same interface as `SafetensorsReader`: `name in reader`, `reader.get(name)` and
    `reader.total_bytes()`. Names map through gguf's tables for the file's architecture
    (`blk.3.attn_q.weight` <-> `model.layers.3.self_attn.q_proj.weight`).
    """

    def __init__(self, gguf_file: str):
        self.model_dir = os.fspath(gguf_file)  # named as on SafetensorsReader, for messages
        self._reader = open_gguf(self.model_dir)  # memory-mapped
        self.architecture = _value(self._reader, "general.architecture")
        arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
        if self.architecture not in arch_ids:
            raise ValueError(f"{self.model_dir}: GGUF architecture {self.architecture!r} is "
                             "unknown to the gguf package")
        key = lambda name: _value(self._reader, f"{self.architecture}.{name}")  # noqa: E731
        self.num_heads = key("attention.head_count")
        self.num_kv_heads = key("attention.head_count_kv") or self.num_heads
        # HF module name -> GGUF tensor name (without .weight/.bias), for every layer
        self._names = gguf.get_tensor_name_map(arch_ids[self.architecture], key("block_count"))
        # GGUF name -> GGUFTensor (a memory-mapped view of its stored bytes)
        self.tensors = self._reader.tensors

    def __contains__(self, name: str) -> bool:
        return self._gguf_name(name) is not None

    def total_bytes(self) -> int:
        return sum(int(tensor.n_bytes) for tensor in self.tensors.values())

    def get(self, name: str) -> np.ndarray:
        """The tensor of HF name `name`, dequantized, in HF's (torch) layout."""
        gguf_name = self._gguf_name(name)
        if gguf_name is None:
            raise KeyError(f"tensor {name!r} is not in the GGUF checkpoint {self.model_dir}")
        tensor = self.tensors[gguf_name]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise ValueError(f"GGUF tensor {gguf_name!r} (for {name!r}) is stored as "
                             f"{tensor.tensor_type.name}, which gguf cannot dequantize "
                             f"({error})") from error
        # ggml lists dimensions innermost first; HF (torch) outermost first
        values = values.reshape([int(n) for n in reversed(tensor.shape)])
        if self.architecture in _PERMUTED_ARCHITECTURES:
            if ".attn_q." in gguf_name:
                values = _unpermute_rows(values, self.num_heads)
            elif ".attn_k." in gguf_name:
                values = _unpermute_rows(values, self.num_kv_heads)
        return values

    def get_quantized(self, name: str, dtype_name: str = "float32") -> QuantizedWeight | None:
        """The 2-D tensor of HF name `name` ([N, K]) as a [K, N] `QuantizedWeight`
        repacked from its stored blocks (gguf_quant.py), or None where it is stored in a
        type that is not repacked (F32, F16, the other quantizations)."""
        gguf_name = self._gguf_name(name)
        if gguf_name is None:
            raise KeyError(f"tensor {name!r} is not in the GGUF checkpoint {self.model_dir}")
        tensor = self.tensors[gguf_name]
        if len(tensor.shape) != 2:
            return None
        row_length, num_rows = (int(n) for n in tensor.shape)  # ggml: innermost first
        weight = repack(tensor.data, tensor.tensor_type, num_rows, row_length,
                        dtype_name=dtype_name)
        if weight is None or self.architecture not in _PERMUTED_ARCHITECTURES:
            return weight
        heads = (self.num_heads if ".attn_q." in gguf_name
                 else self.num_kv_heads if ".attn_k." in gguf_name else None)
        if heads is None:
            return weight
        order = _unpermute_rows(np.arange(num_rows), heads)  # [N]: HF row <- stored row
        return weight.map(lambda a: np.ascontiguousarray(a[:, order]))

    def tensor_type_name(self, name: str) -> str:
        """How the GGUF stores HF tensor `name` (F32, Q4_1, ...)."""
        return self.tensors[self._gguf_name(name)].tensor_type.name

    def _gguf_name(self, name: str) -> str | None:
        """The GGUF tensor holding HF tensor `name`, None when the file has none."""
        module, _, suffix = name.rpartition(".")
        base = self._names.get_name(module) if suffix in ("weight", "bias") else None
        gguf_name = None if base is None else f"{base}.{suffix}"
        if gguf_name == "output.weight" and gguf_name not in self.tensors:
            gguf_name = "token_embd.weight"  # llama.cpp writes no LM head when it is tied
        return gguf_name if gguf_name in self.tensors else None


def _unpermute_rows(rows: np.ndarray,  # [heads * H, ...], per head (H/2, 2) pairs interleaved
                    num_heads: int) -> np.ndarray:  # [heads * H, ...], per head (2, H/2) halves
    """Undoes llama.cpp's Q/K permutation (its converter's `permute`) for HF's rotate_half."""
    half = rows.shape[0] // num_heads // 2
    pairs = rows.reshape(num_heads, half, 2, *rows.shape[1:])
    return pairs.swapaxes(1, 2).reshape(rows.shape)


def _rope_parameters(gguf_file: str, key, rotary_dim: int, freq_factors) -> dict[str, object]:
    """transformers' rope_parameters from `{arch}.rope.*`, or from the per-frequency factors
    of a `rope_freqs.weight` tensor (Llama 3.1+); unknown scaling types fail."""
    params: dict[str, object] = {"rope_type": "default",
                                 "rope_theta": float(key("rope.freq_base", 10000.0))}
    if freq_factors is not None:
        factors = gguf.quants.dequantize(freq_factors.data, freq_factors.tensor_type)
        return llama3_rope_from_factors(factors.reshape(-1), params["rope_theta"], rotary_dim)
    scaling = key("rope.scaling.type", "none")
    if scaling not in _ROPE_SCALING_TYPES:
        raise ValueError(f"{gguf_file}: RoPE scaling type {scaling!r} is not supported "
                         f"(supported: {', '.join(_ROPE_SCALING_TYPES)})")
    if scaling == "none":
        return params
    params.update(rope_type=scaling, factor=float(key("rope.scaling.factor")))
    if scaling == "yarn":
        params["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
        params.update({name: float(key(f"rope.scaling.{gguf_key}"))
                       for gguf_key, name in _YARN_KEYS
                       if key(f"rope.scaling.{gguf_key}") is not None})
    return params


def llama3_rope_from_factors(factors: np.ndarray,  # [H/2]: each frequency is divided by it
                             theta: float, head_dim: int) -> dict[str, object]:
    """rope_parameters that reproduce llama.cpp's per-frequency RoPE factors (Llama 3.1+).

    Llama 3's rule sees a wavelength w only through the line s(1/w) = (old_len / w - low) /
    (high - low): factor 1 where s >= 1, `factor` where s <= 0, 1 / ((1 - s) / factor + s)
    between. The line is fitted through the in-between frequencies (or, with fewer than two,
    drawn as steep as the kept and scaled ones need) and spelled with low_freq_factor = 1.
    """
    params = {"rope_type": "default", "rope_theta": float(theta)}
    factor = float(factors.max())
    if factor <= 1.0:
        return params
    x = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * np.pi)  # [H/2] 1 / wavelength
    s = (1 / factors.astype(np.float64) - 1 / factor) / (1 - 1 / factor)  # [H/2]
    medium, kept, scaled = (s > 1e-6) & (s < 1 - 1e-6), s >= 1 - 1e-6, s <= 1e-6
    if not kept.any() and not medium.any():  # every frequency scaled alike
        return {**params, "rope_type": "linear", "factor": factor}
    if medium.sum() >= 2:
        slope, intercept = np.polyfit(x[medium], s[medium], 1)
    else:
        x_mid, s_mid = (x[medium][0], s[medium][0]) if medium.any() else (x[kept].min(), 1.0)
        bounds = [s_mid / (x_mid - x[scaled].max())]  # scaled ones stay at s <= 0
        if kept.any() and medium.any():  # kept ones stay at s >= 1
            bounds.append((1 - s_mid) / (x[kept].min() - x_mid))
        slope = max(bounds)
        intercept = s_mid - slope * x_mid
    fitted = np.clip(slope * x + intercept, 0.0, 1.0)  # [H/2]
    if not (slope > 0 > intercept) or not np.allclose(
            1 / ((1 - fitted) / factor + fitted), factors, rtol=1e-4):
        raise ValueError(f"RoPE frequency factors {factors.tolist()} do not follow Llama 3's rule")
    width = -1 / intercept  # high_freq_factor - low_freq_factor
    return {**params, "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 1.0 + width, "original_max_position_embeddings": slope * width}


def _value(reader: GGUFFile, key: str, default=None):
    """One metadata value as a Python scalar, string or list; `default` when absent."""
    return reader.get(key, default)

