"""QuantizedWeight: quantize() error bounds, dequantize() as the reference, a pytree an
nnx.Param holds, and Ops.dense / gated_mlp over it equal to the dequantized product on XLA's
path and on the native quantized GEMM."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.model.ops import Ops
from jaxserve.model.quantization import QuantizedWeight, quantize
from jaxserve.testing.native_kernels import needs_compiler

# (kind, group size): int8 per channel, int4 in groups of 32 and 128
KINDS = [("int8", None), ("int4", 32), ("int4", 128)]


def _weight(k=256, n=48, seed=0) -> np.ndarray:  # [K, N]
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


@pytest.mark.parametrize("kind,group", KINDS)
def test_quantize_rounds_each_weight_to_within_half_a_step(kind, group):
    w = _weight()
    qw = quantize(w, kind, group_size=group)
    g = qw.group_size
    assert g == (256 if kind == "int8" else group)
    assert qw.packed.dtype == (np.int8 if kind == "int8" else np.uint8)
    assert qw.packed.shape == ((256, 48) if kind == "int8" else (128, 48))
    assert qw.scales.shape == (256 // g, 48)
    step = np.repeat(qw.scales, g, axis=0)  # [K, N]
    assert np.all(np.abs(qw.dequantize() - w) <= 0.5 * step * (1 + 1e-5) + 1e-7)


def test_int4_packs_two_rows_of_k_per_byte():
    w = _weight(k=64, n=4)
    qw = quantize(w, "int4", group_size=32)
    q = np.rint((qw.dequantize() - np.repeat(qw.mins, 32, axis=0))
                / np.repeat(qw.scales, 32, axis=0)).astype(np.uint8)  # [K, N] 0..15
    assert np.array_equal(qw.packed & 0xF, q[0::2]) and np.array_equal(qw.packed >> 4, q[1::2])


def test_a_group_size_that_does_not_divide_k_is_refused():
    with pytest.raises(ValueError, match="group_size 32 does not divide K=48"):
        quantize(_weight(k=48), "int4", group_size=32)
    with pytest.raises(ValueError, match="kind must be"):
        quantize(_weight(), "int3")


def test_an_nnx_param_holds_it_and_split_merge_keep_the_packed_arrays():
    qw = jax.tree.map(jnp.asarray, quantize(_weight(), "int4", group_size=32))
    module = nnx.Module()
    module.kernel = nnx.Param(qw)
    graphdef, state = nnx.split(module)
    leaves = jax.tree.leaves(state)
    assert sorted(str(a.dtype) for a in leaves) == ["float32", "float32", "uint8"]
    merged = nnx.merge(graphdef, state)
    assert isinstance(merged.kernel[...], QuantizedWeight)
    np.testing.assert_array_equal(merged.kernel[...].dequantize(), qw.dequantize())


def _product_inputs(kind, group, m=5):
    qw = jax.tree.map(jnp.asarray, quantize(_weight(), kind, group_size=group))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((m, 256)), jnp.float32)
    return x, qw


@pytest.mark.parametrize("kind,group", KINDS)
def test_xla_dense_is_the_dot_over_the_weight_dequantized_in_the_step(kind, group):
    x, qw = _product_inputs(kind, group)
    y = jax.jit(lambda x, w: Ops().dense(x, w, None))(x, qw)
    ref = np.asarray(x, np.float64) @ np.asarray(qw.dequantize(), np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)
    # the step's parameters are the packed integers, never a float copy of the weight
    params = jax.jit(lambda x, w: Ops().dense(x, w, None)).lower(x, qw).args_info[0][1]
    assert {str(a.dtype) for a in jax.tree.leaves(params)} <= {"int8", "uint8", "float32"}
    assert jax.tree.leaves(params)[0].shape == qw.packed.shape


@needs_compiler
@pytest.mark.parametrize("kind,group", KINDS)
def test_native_dense_and_gated_mlp_equal_xlas_dequantized_products(kind, group):
    x, qw = _product_inputs(kind, group)
    up = jax.tree.map(jnp.asarray, quantize(_weight(seed=3), kind, group_size=group))
    rows = jnp.int32(3)
    native, xla = Ops(native_dense=True), Ops()
    hlo = jax.jit(lambda x, w: native.dense(x, w, rows)).lower(x, qw).as_text()
    assert "jaxserve_qmatmul" in hlo
    got = jax.jit(lambda x, w: native.dense(x, w, rows))(x, qw)
    want = xla.dense(x, qw, None)
    np.testing.assert_allclose(got[:3], want[:3], rtol=1e-5, atol=1e-4)
    assert not np.asarray(got[3:]).any()
    gated_fn = jax.jit(lambda x, g, u: native.gated_mlp(x, g, u, rows))
    assert "jaxserve_qmatmul_gated" in gated_fn.lower(x, qw, up).as_text()  # one call
    gated = gated_fn(x, qw, up)
    np.testing.assert_allclose(gated[:3], xla.gated_mlp(x, qw, up, None)[:3],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("bits,scale_dtype", [(8, jnp.float32), (4, jnp.float32),
                                              (4, jnp.float16)])  # float16: GGUF's Q4_1
def test_the_xla_product_lowers_for_gpu_and_tpu_from_the_packed_weight(platform, bits,
                                                                        scale_dtype):
    from jax import export

    k, n, group = 1536, 8960, 128  # a 1.5B model's down projection, bfloat16 activations
    packed = jax.ShapeDtypeStruct((k if bits == 8 else k // 2, n),
                                  jnp.int8 if bits == 8 else jnp.uint8)
    groups = jax.ShapeDtypeStruct((k // group, n), scale_dtype)
    weight = QuantizedWeight(packed, groups, groups if bits == 4 else None, bits, group,
                             "bfloat16")
    x = jax.ShapeDtypeStruct((64, k), jnp.bfloat16)
    exported = export.export(jax.jit(lambda x, w: Ops().dense(x, w, None)),
                             platforms=[platform])(x, weight)
    assert exported.out_avals[0].shape == (64, n)
    assert exported.out_avals[0].dtype == jnp.bfloat16
    assert [a.dtype for a in exported.in_avals[1:3]] == [packed.dtype, scale_dtype]
