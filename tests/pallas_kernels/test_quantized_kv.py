"""8-bit KV pools (kv_quant.py): the row format round-trips, and every attention path reads
a quantized pool exactly as the reference reads its dequantized values (the Pallas kernels
interpreted, slow; their lowering for cuda and tpu is in test_lowering.py).

Against the dequantized pool the tolerance is the float32 kernels' own (same math, only the
order of the float32 products differs). Against the original float pool it is the storage
error, measured on unit-normal K/V (`FLOAT_POOL_TOLERANCE`): e4m3 keeps 3 mantissa bits (a
row value is off by up to 1/16 of itself), int8 127 steps of the row's absmax.
"""

import numpy as np
import pytest

import jax.numpy as jnp

import pallas_kernels.ragged_paged_attention as rpa
from jaxserve.testing.native_kernels import needs_compiler
from pallas_kernels.cpu import build
from pallas_kernels.ragged_paged_attention import cpu, gpu, kv_quant, tpu

KV_DTYPES = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}
# max |out - float-pool reference| on unit-normal K/V (measured: 0.12 and 0.015)
FLOAT_POOL_TOLERANCE = {"fp8": 0.25, "int8": 0.04}
SAME_MATH = 2e-5  # float32 queries: the kernels' tolerance against the reference
CASE = dict(q_lens=[1, 9, 4], kv_lens=[31, 9, 20], num_tokens=16, num_heads=6, num_kv_heads=1,
            head_dim=64, page_size=32)  # decode, prefill and a prefix hit, one padding row


def _quantized_batch(make_batch, kv_dtype, q_dtype=jnp.float32, **case):
    """(float batch, quantized batch, scales as kwargs, dequantized batch) of one NaN-
    poisoned ragged batch: NaN rows quantize to NaN scales, so stray reads still show."""
    batch = make_batch(**{**CASE, **case}, dtype=jnp.float32)
    (k, k_scales), (v, v_scales) = (kv_quant.quantize(x, kv_dtype) for x in batch[1:3])
    q = batch[0].astype(q_dtype)
    quantized = (q, k, v, *batch[3:])
    dequantized = (q, kv_quant.dequantize(k, k_scales), kv_quant.dequantize(v, v_scales),
                   *batch[3:])
    return batch, quantized, dict(k_scales=k_scales, v_scales=v_scales), dequantized


def _check(out, ref, batch, tol):
    num_real = int(np.asarray(batch[5])[-1])
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "NaN or inf: a stray read of a poisoned slot"
    np.testing.assert_array_equal(out[num_real:], 0.0, err_msg="padding rows not zero")
    np.testing.assert_allclose(out[:num_real], ref[:num_real], atol=tol, rtol=tol)


@pytest.mark.parametrize("name", list(KV_DTYPES))
def test_a_quantized_row_reads_back_within_its_storage_error(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 64)).astype(np.float32) * rng.uniform(0.01, 100, (5, 3, 1))
    x[2, 1] = 0.0  # an all-zero row (a fresh slot) keeps scale 0 and reads 0
    stored, scale = kv_quant.quantize(jnp.asarray(x), KV_DTYPES[name])
    assert stored.dtype == KV_DTYPES[name] and scale.shape == (5, 3, 1)
    assert scale.dtype == jnp.float16
    back = np.asarray(kv_quant.dequantize(stored, scale))
    scale = np.asarray(scale, np.float32)
    # the float16 at or above absmax / qmax: never below it, at most one float16 step over
    wanted = np.abs(x).max(-1, keepdims=True) / (448 if name == "fp8" else 127)
    assert (scale >= wanted).all()
    np.testing.assert_allclose(scale, wanted, rtol=2.0 ** -10, atol=2.0 ** -24)
    assert float(scale[2, 1, 0]) == 0.0 and not back[2, 1].any()
    # int8: half a step of the row; e4m3: 1/16 of the value (subnormals: 2^-10 of the step)
    bound = scale / 2 if name == "int8" else np.maximum(np.abs(x) / 16, scale * 2.0 ** -10)
    assert (np.abs(back - x) <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("name", list(KV_DTYPES))
def test_float16_scales_are_never_inf_or_zero_for_a_nonzero_row(name):
    qmax = 448 if name == "fp8" else 127
    absmax = np.array([1e-9, 3e-8, 1e-5, 1.0, 1e4, 448 * 65504 * 0.999, 1e9, 1e30], np.float32)
    x = np.zeros((len(absmax), 8), np.float32)
    x[:, 0], x[:, 1] = absmax, -absmax / 3
    stored, scale = kv_quant.quantize(jnp.asarray(x), KV_DTYPES[name])
    scale = np.asarray(scale, np.float32)[:, 0]
    assert np.isfinite(scale).all() and (scale > 0).all()
    back = np.asarray(kv_quant.dequantize(stored, scale[:, None]))
    assert np.isfinite(back).all()
    # within float16's range a row reads back within its storage error; past it (absmax
    # above qmax * 65504) rows saturate at that bound, still finite
    in_range = absmax <= qmax * 65504
    bound = np.maximum(absmax / (16 if name == "fp8" else 100), 2.0 ** -24 * qmax)
    assert (np.abs(back - x).max(-1)[in_range] <= bound[in_range]).all()
    np.testing.assert_allclose(back[~in_range, 0], qmax * 65504, rtol=1e-3)


@pytest.mark.slow  # the CPU kernel test checks the same against the reference
@pytest.mark.parametrize("name", list(KV_DTYPES))
def test_the_reference_reads_a_quantized_pool_as_its_dequantized_values(name, make_batch):
    batch, quantized, scales, dequantized = _quantized_batch(make_batch, KV_DTYPES[name])
    out = rpa.reference_attention(*quantized, sm_scale=0.125, **scales)
    _check(out, rpa.reference_attention(*dequantized, sm_scale=0.125), batch, 1e-6)
    _check(out, rpa.reference_attention(*batch, sm_scale=0.125), batch,
           FLOAT_POOL_TOLERANCE[name])


@needs_compiler
@pytest.mark.parametrize("name", list(KV_DTYPES))
def test_cpu_kernel_reads_a_quantized_pool(name, make_batch, march):
    batch, quantized, scales, dequantized = _quantized_batch(make_batch, KV_DTYPES[name])
    out = cpu.ragged_paged_attention(*quantized, sm_scale=0.125, march=march, **scales)
    _check(out, rpa.reference_attention(*dequantized, sm_scale=0.125), batch, SAME_MATH)
    _check(out, rpa.reference_attention(*batch, sm_scale=0.125), batch,
           FLOAT_POOL_TOLERANCE[name])


@pytest.mark.slow  # one more build of the kernel
@needs_compiler
@pytest.mark.parametrize("name", list(KV_DTYPES))
def test_cpu_kernel_reads_a_quantized_pool_built_for_avx2(name, make_batch):
    if not build.can_execute("x86-64-v3"):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    batch, quantized, scales, dequantized = _quantized_batch(make_batch, KV_DTYPES[name])
    out = cpu.ragged_paged_attention(*quantized, sm_scale=0.125, march="x86-64-v3", **scales)
    _check(out, rpa.reference_attention(*dequantized, sm_scale=0.125), batch, SAME_MATH)


@pytest.mark.slow
@needs_compiler
def test_cpu_kernel_reads_a_quantized_pool_under_bfloat16_queries(make_batch):
    batch, quantized, scales, dequantized = _quantized_batch(
        make_batch, jnp.float8_e4m3fn, jnp.bfloat16, head_dim=40)  # 40: the scalar tail too
    out = cpu.ragged_paged_attention(*quantized, sm_scale=0.125, **scales)
    assert out.dtype == jnp.bfloat16
    _check(out, rpa.reference_attention(*dequantized, sm_scale=0.125), batch, 2e-2)


@pytest.mark.slow  # the interpreter takes seconds per call
@pytest.mark.parametrize("backend,name", [("gpu", "fp8"), ("gpu", "int8"), ("tpu", "fp8"),
                                          ("tpu", "int8")])
def test_pallas_kernels_read_a_quantized_pool_interpreted(backend, name, make_batch):
    kernel = {"gpu": gpu, "tpu": tpu}[backend].ragged_paged_attention
    batch, quantized, scales, dequantized = _quantized_batch(make_batch, KV_DTYPES[name])
    out = kernel(*quantized, sm_scale=0.125, interpret=True, **scales)
    _check(out, rpa.reference_attention(*dequantized, sm_scale=0.125), batch, SAME_MATH)


@pytest.mark.slow  # the reference path of the entry point; the CPU kernel's is the default
def test_the_entry_point_passes_the_scales_to_the_named_kernel(make_batch):
    batch, quantized, scales, dequantized = _quantized_batch(make_batch, jnp.int8)
    out = rpa.ragged_paged_attention(*quantized, sm_scale=0.125, backend="reference", **scales)
    _check(out, rpa.reference_attention(*dequantized, sm_scale=0.125), batch, 1e-6)


@pytest.mark.parametrize("change,message", [
    (dict(k_scales=None, v_scales=None), "needs k_scales"),
    (dict(v_scales=None), "come together"),
    (dict(k_scales=jnp.zeros((1, 3, 32), jnp.float16)), "k_scales must be float16"),
    (dict(v_scales=jnp.zeros((1, 3, 32, 1), jnp.float32)), "v_scales must be float16"),
])
def test_a_quantized_pool_without_matching_scales_is_rejected(change, message, make_batch):
    _, quantized, scales, _ = _quantized_batch(make_batch, jnp.int8, extra_pages=0,
                                               q_lens=[1], kv_lens=[3], num_tokens=1)
    with pytest.raises(ValueError, match=message):
        rpa.ragged_paged_attention(*quantized, sm_scale=0.125, backend="reference",
                                   **{**scales, **change})
