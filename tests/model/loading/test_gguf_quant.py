"""GGUF blocks repacked into QuantizedWeights dequantize to exactly what the gguf package's
dequantization gives, for every repacked type (random blocks, valid float16 scales)."""

import gguf
import numpy as np
import pytest

from jaxserve.model.loading.gguf_quant import REPACKED_TYPES, repack

T = gguf.GGMLQuantizationType
# where each type keeps its float16 fields (byte offsets in a block)
_F16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q4_K: (0, 2), T.Q5_K: (0, 2),
               T.Q6_K: (208,)}
_FORMS = {T.Q8_0: (8, 32, False), T.Q4_0: (4, 32, False), T.Q4_1: (4, 32, True),
          T.Q4_K: (4, 32, True), T.Q5_K: (8, 32, True), T.Q6_K: (8, 16, False)}


def _random_blocks(qtype, n: int, k: int, seed: int = 0) -> np.ndarray:  # [N, bytes per row]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n * k // block, block_bytes), dtype=np.uint8)
    for offset in _F16_FIELDS[qtype]:
        values = rng.uniform(-0.05, 0.05, len(raw)).astype(np.float16)
        raw[:, offset:offset + 2] = values.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def test_every_listed_type_is_checked():
    assert set(REPACKED_TYPES) == {t.name for t in _FORMS}


@pytest.mark.parametrize("qtype", list(_FORMS), ids=lambda t: t.name)
def test_repacked_blocks_dequantize_exactly_as_gguf_does(qtype):
    n, k = 24, 512  # [N, K] as HF stores a Linear weight
    data = _random_blocks(qtype, n, k)
    weight = repack(data, qtype, n, k)
    bits, group, has_min = _FORMS[qtype]
    assert (weight.bits, weight.group_size, weight.mins is not None) == (bits, group, has_min)
    assert weight.shape == (k, n)
    # a block's own float16 scale and min stay float16; the K-quants' products are float32
    stored = qtype in (T.Q8_0, T.Q4_0, T.Q4_1)
    assert weight.scales.dtype == (np.float16 if stored else np.float32)
    assert weight.mins is None or weight.mins.dtype == weight.scales.dtype
    expected = gguf.quants.dequantize(data, qtype).reshape(n, k).T  # [K, N]
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(weight.dequantize(), expected)


def test_other_types_are_left_to_dequantization():
    data = np.zeros((4, 32 * 4), np.uint8)
    assert repack(data, T.F32, 4, 32) is None
    assert repack(np.zeros((4, 22), np.uint8), T.Q5_0, 4, 32) is None
