"""Random-weight Qwen2 checkpoints with a tokenizer, for benchmarks and end-to-end tests.

`save_random_checkpoint(out_dir, preset)` builds a transformers `Qwen2ForCausalLM` from a
named preset with weights drawn from a fixed seed, saves it in float32 safetensors and
saves the test tokenizer beside it, so the directory loads with `AutoTokenizer` and with
jaxserve's loader. The token ids carry no meaning: the point is the shapes and the cost.
"""

from __future__ import annotations

import os

from jaxserve.testing.tokenizer import save_tokenizer

# Qwen2 shapes per preset. qwen2-40m: 40,516,096 parameters (the LM head is tied);
# qwen2.5-0.5b: Qwen2.5-0.5B's shapes (tied), 494,032,768 parameters.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "qwen2-40m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=4096),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768),
}


def save_random_checkpoint(out_dir: str | os.PathLike, preset: str = "qwen2-40m",
                           seed: int = 0) -> str:
    """Writes config.json, generation_config.json, model.safetensors and the tokenizer.

    Returns the directory. The same `preset` and `seed` give the same weights and tokens.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    import torch
    import transformers

    shape = PRESETS[preset]
    path = os.fspath(out_dir)
    os.makedirs(path, exist_ok=True)
    tokenizer = save_tokenizer(path, vocab_size=shape["vocab_size"])
    if len(tokenizer) > shape["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's "
                         f"vocab_size={shape['vocab_size']}")
    eos = tokenizer.eos_token_id
    config = transformers.Qwen2Config(**shape, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                      rope_parameters=dict(rope_type="default",
                                                           rope_theta=1e6),
                                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                                      torch_dtype="float32")
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(path)
    return path
