"""Fixtures of the parallel tests: a tiny checkpoint whose heads split over up to 8 ranks."""

import pytest


@pytest.fixture(scope="session")
def heads8_checkpoint(tmp_path_factory):
    """A 2-layer Qwen2 (q/k/v biases, tied): 8 query heads, 2 KV heads, head dim 8."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape)
            param.copy_(1.0 + 0.3 * noise if "norm" in name else 0.3 * noise)
    path = tmp_path_factory.mktemp("qwen2-8heads")
    model.save_pretrained(path)
    return str(path)
