"""A GGUF's quantized embedding table kept as stored: the lookup gives the dequantized rows
exactly, and the tied LM head (logits and the fused greedy head on the native kernels)
equals the head over the table dequantized to float32 (`quantization="none"`)."""

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.model.loading.loader import load_model
from jaxserve.model.ops import select_ops
from jaxserve.model.quantization import QuantizedWeight

from .test_gguf import tiny_gguf  # noqa: F401 (the fixture)

# Q8_0: the default model's table (int4 heads: the kernel tests' Q4_0 / Q4_1 forms)
QTYPES = [gguf.GGMLQuantizationType.Q8_0]


@pytest.fixture(scope="module")
def kept_and_dense(tiny_gguf):  # noqa: F811
    ops = select_ops(platform="cpu")
    built = {}

    def get(qtype):
        if qtype not in built:
            path = tiny_gguf("qwen2", qtype)  # qwen2: tied embeddings
            config = ModelConfig.from_pretrained(path, dtype="float32")
            built[qtype] = (load_model(path, config, ops=ops), load_model(
                path, dataclasses.replace(config, quantization="none"), ops=ops))
        return built[qtype]

    return get


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_the_lookup_dequantizes_exactly_the_rows_it_gathers(kept_and_dense, qtype):
    kept, dense = kept_and_dense(qtype)
    assert isinstance(kept.embed_tokens.embedding[...], QuantizedWeight)
    assert kept.embed_tokens.head_kn is None  # no float copy of the table
    ids = jnp.asarray([0, 5, 255, 5, 17], jnp.int32)
    np.testing.assert_array_equal(np.asarray(kept.embed_tokens(ids)),
                                  np.asarray(dense.embed_tokens(ids)))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_the_tied_head_equals_the_head_over_the_dequantized_table(kept_and_dense, qtype):
    kept, dense = kept_and_dense(qtype)
    hidden = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64)), jnp.float32)
    logits = np.asarray(kept.compute_logits(hidden, jnp.int32(4)))
    expected = np.asarray(dense.compute_logits(hidden, jnp.int32(4)))
    scale = np.abs(np.asarray(hidden)) @ np.abs(np.asarray(dense.embed_tokens.embedding[...])).T
    assert np.all(np.abs(logits - expected) <= 1e-5 * scale + 1e-6)
    tokens = np.asarray(kept.greedy_token_ids(hidden, jnp.int32(3)))
    np.testing.assert_array_equal(tokens[:3], expected[:3].argmax(axis=-1))
    np.testing.assert_array_equal(tokens[:3], np.asarray(dense.greedy_token_ids(
        hidden, jnp.int32(3)))[:3])
    assert tokens[3] == 0  # past the real rows
