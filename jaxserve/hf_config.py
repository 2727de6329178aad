"""What `ModelConfig.from_pretrained` reads from a transformers config: the model's fields
(RoPE, per-layer sliding windows, biases, EOS ids) and Baichuan's config.json (which
transformers only knows as remote code). Imports transformers only to read a config.
"""

from __future__ import annotations

import json
import os


def model_config_fields(hf, path: str) -> dict[str, object]:
    """ModelConfig's fields from a transformers config (all but dtype and max_model_len);
    ValueError for what no model here implements."""
    architectures = getattr(hf, "architectures", None) or []
    if not architectures:
        raise ValueError(f"ModelConfig.architecture: {path}/config.json lists no `architectures`")
    hidden_act = getattr(hf, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"ModelConfig: hidden_act must be 'silu', got {hidden_act!r}")
    rope_theta, rope_scaling = hf_rope(hf)
    windows = hf_layer_windows(hf)
    bias = bool(getattr(hf, "attention_bias", False))
    qwen2 = architectures[0] == "Qwen2ForCausalLM"  # q/k/v always biased, o never
    if architectures[0] == "Qwen2MoeForCausalLM":  # q/k/v biased unless qkv_bias=False
        qwen2 = bool(getattr(hf, "qkv_bias", True))
    return dict(
        model_dir=path,
        architecture=architectures[0],
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=qwen2 or bias,
        o_proj_bias=bias and not qwen2,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=architectures[0] == "Qwen3ForCausalLM",
        sliding_window=next((w for w in windows if w is not None), None),
        layer_sliding_windows=windows,
        max_position_embeddings=hf.max_position_embeddings,
        eos_token_ids=hf_eos_token_ids(hf, path),
        bos_token_id=getattr(hf, "bos_token_id", None),
        kv_latent_dim=(hf.kv_lora_rank + hf.qk_rope_head_dim
                       if getattr(hf, "kv_lora_rank", None) else None),
        hf_config=hf,
    )


# Checkpoints whose config.json transformers cannot read without trust_remote_code.
_BAICHUAN_ARCHITECTURES = ("BaichuanForCausalLM", "BaiChuanForCausalLM")


def read_hf_config(path: str):
    """transformers' AutoConfig, or for Baichuan (model_type "baichuan", unknown to
    transformers) a plain `PretrainedConfig` of config.json, with `max_position_embeddings`
    taken from 13B's `model_max_length` and silu / untied defaults filled in."""
    import transformers

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    architectures = raw.get("architectures") or [""]
    if raw.get("model_type") != "baichuan" and architectures[0] not in _BAICHUAN_ARCHITECTURES:
        return transformers.AutoConfig.from_pretrained(path)
    raw.setdefault("max_position_embeddings", raw.get("model_max_length", 4096))
    raw.setdefault("hidden_act", "silu")
    raw.setdefault("tie_word_embeddings", False)
    raw.pop("auto_map", None)  # the remote code we do not run
    return transformers.PretrainedConfig(**raw)


def hf_rope(hf) -> tuple[float, dict[str, object] | None]:
    """(rope_theta, normalized rope_scaling) from transformers 5's `rope_parameters` or the
    older top-level `rope_theta` + `rope_scaling`."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError("ModelConfig.rope_scaling: per-layer RoPE parameters are not supported")
    params = dict(params)
    theta = params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
    rope_type = params.pop("rope_type", None) or params.get("type") or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", None) or getattr(hf, "partial_rotary_factor", None)
    if partial not in (None, 1, 1.0):
        raise ValueError(f"ModelConfig.rope_scaling: partial_rotary_factor={partial} is not supported")
    if rope_type == "default":
        return float(theta), None
    if rope_type in ("llama3", "yarn"):
        # transformers gives a top-level original_max_position_embeddings priority (Phi3).
        original = getattr(hf, "original_max_position_embeddings", None)
        params.setdefault("original_max_position_embeddings", original or hf.max_position_embeddings)
        if original:
            params["original_max_position_embeddings"] = original
    if rope_type == "yarn" and params.get("factor") is None:
        params["factor"] = hf.max_position_embeddings / params["original_max_position_embeddings"]
    return float(theta), {"rope_type": rope_type, **params}


def hf_layer_windows(hf) -> tuple[int | None, ...]:
    """Each layer's sliding window: Mistral windows every layer; Qwen2/3 only the layers that
    `layer_types` (or, before transformers 5, `max_window_layers`) marks, if enabled at all."""
    num_layers = hf.num_hidden_layers
    window = getattr(hf, "sliding_window", None)
    if not window or not getattr(hf, "use_sliding_window", True):
        return (None,) * num_layers
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    first = getattr(hf, "max_window_layers", 0)
    return tuple(window if i >= first else None for i in range(num_layers))


def hf_eos_token_ids(hf, path: str) -> tuple[int, ...]:
    """EOS ids of config.json, then those generation_config.json adds (Llama 3 instruct)."""
    ids = list(_as_token_ids(getattr(hf, "eos_token_id", None)))
    generation = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation):
        with open(generation) as f:
            extra = _as_token_ids(json.load(f).get("eos_token_id"))
        ids += [i for i in extra if i not in ids]
    return tuple(ids)


def _as_token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
