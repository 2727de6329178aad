"""HF `architectures` names -> model classes.

A name maps to "module:Class" so that looking up one family never imports the others.
Several names may share a class when the differences fit in `ModelConfig` (the Llama
family covers Llama, Qwen2 / Qwen2.5, Mistral and Qwen3).
"""

import importlib

# HF architecture name -> "module:Class" implementing it.
_MODELS: tuple[tuple[str, str], ...] = (
    ("BaiChuanForCausalLM", "jaxserve.model.baichuan:BaichuanForCausalLM"),
    ("BaichuanForCausalLM", "jaxserve.model.baichuan:BaichuanForCausalLM"),
    ("DeepseekV2ForCausalLM", "jaxserve.model.deepseek_v2:DeepseekV2ForCausalLM"),
    ("LlamaForCausalLM", "jaxserve.model.llama:LlamaForCausalLM"),
    ("MistralForCausalLM", "jaxserve.model.llama:LlamaForCausalLM"),
    ("MixtralForCausalLM", "jaxserve.model.mixtral:MixtralForCausalLM"),
    ("Qwen2ForCausalLM", "jaxserve.model.llama:LlamaForCausalLM"),
    ("Qwen2MoeForCausalLM", "jaxserve.model.qwen2_moe:Qwen2MoeForCausalLM"),
    ("Qwen3ForCausalLM", "jaxserve.model.llama:LlamaForCausalLM"),
)


def supported_architectures() -> tuple[str, ...]:
    """Every HF architecture name this build can serve, sorted."""
    return tuple(sorted(name for name, _ in _MODELS))


def model_class(architecture: str) -> type:
    """The model class for an HF architecture name; ValueError listing the supported ones."""
    target = dict(_MODELS).get(architecture)
    if target is None:
        raise ValueError(f"unknown model architecture {architecture!r}; supported: "
                         f"{', '.join(supported_architectures())}")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
