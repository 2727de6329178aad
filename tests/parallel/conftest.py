"""Fixtures of the parallel tests: a tiny checkpoint whose heads split over up to 8 ranks and
the engine budgets its tests share, and `jaxserve` subprocesses with their own number of CPU
devices (multi-host tests)."""

import os
import socket
import subprocess
import sys

import pytest


def _start_jaxserve(args, *, devices: int) -> subprocess.Popen:
    """`python -m jaxserve.entrypoints.cli ARGS` on `devices` CPU devices, output piped."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "-m", "jaxserve.entrypoints.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def start_jaxserve():
    return _start_jaxserve


@pytest.fixture
def free_port():
    return _free_port


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


@pytest.fixture(scope="session")
def heads8_engine_kwargs():
    """The budgets of every engine on `heads8_checkpoint`: small buckets, and 12 blocks of
    16 tokens, which tests/parallel/test_tensor_parallel.py's prompts overflow (preemption).
    One set, so engines of one TP size share their programs through the compilation cache."""
    return dict(max_num_seqs=8, max_num_batched_tokens=32, num_gpu_blocks_override=12,
                max_model_len=96, enable_prefix_caching=True, progress=False,
                skip_tokenizer_init=True, background_compilation=False)
