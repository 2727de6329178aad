"""The batched sampler against numpy references on fixed logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model.sampling import sampler
from jaxserve.model.sampling.sampler import SamplingTensors

V = 12
# The sampler as the engine runs it: one compiled program per shape and variant (op-by-op
# dispatch would compile each of its many operations on its own).
sample = jax.jit(sampler.sample, static_argnames=("all_greedy", "with_logprobs"))


def _tensors(num_rows, **overrides):
    fields = dict(
        temperature=np.ones(num_rows, np.float32), top_k=np.full(num_rows, V, np.int32),
        top_p=np.ones(num_rows, np.float32), min_p=np.zeros(num_rows, np.float32),
        presence_penalty=np.zeros(num_rows, np.float32),
        frequency_penalty=np.zeros(num_rows, np.float32),
        repetition_penalty=np.ones(num_rows, np.float32),
        seeds=np.arange(num_rows, dtype=np.uint32), output_lens=np.zeros(num_rows, np.int32),
        bias_ids=np.full((num_rows, 2), V, np.int32), bias_values=np.zeros((num_rows, 2), np.float32),
        banned_ids=np.full((num_rows, 2), V, np.int32),
        history=np.full((num_rows, 6), V, np.int32), prompt_lens=np.zeros(num_rows, np.int32))
    fields.update({k: np.asarray(v, fields[k].dtype) for k, v in overrides.items()})
    return SamplingTensors(**{k: jnp.asarray(v) for k, v in fields.items()})


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(size=(3, V)).astype(np.float32) * 2


def test_all_greedy_fast_path_is_argmax(logits):
    out = sample(jnp.asarray(logits), None, all_greedy=True, with_logprobs=False)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))


def test_argmax_takes_the_first_maximum_and_a_nan_like_jnp_argmax():
    x = np.array([[1.0, 3.0, 3.0, 2.0],    # tie: the first index
                  [-np.inf, -np.inf, -1.0, -np.inf],
                  [0.0, np.nan, 5.0, np.nan],  # NaN counts as the maximum
                  [7.0, 7.0, 7.0, 7.0]], np.float32)
    got = sampler.argmax(jnp.asarray(x))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), axis=-1))
    np.testing.assert_array_equal(got, [1, 2, 1, 0])


def test_zero_temperature_rows_are_greedy_in_a_mixed_batch(logits):
    t = _tensors(3, temperature=[0.0, 1.0, 0.0])
    out = sample(jnp.asarray(logits), t, all_greedy=False, with_logprobs=False)
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()


def test_penalties_match_vllm_definitions(logits):
    history = [[1, 2, 3, 3, 5, V], [4, 4, 4, V, V, V], [V] * 6]
    t = _tensors(3, history=history, prompt_lens=[2, 1, 0], repetition_penalty=[1.5, 1.0, 2.0],
                 frequency_penalty=[0.5, 0.25, 0.0], presence_penalty=[0.3, 1.0, 0.0],
                 bias_ids=[[0, V], [7, 8], [V, V]], bias_values=[[3.0, 0], [-1.0, 2.0], [0, 0]],
                 banned_ids=[[11, V], [V, V], [V, V]])
    expected = logits.copy()
    expected[0, 0] += 3
    expected[1, 7] -= 1
    expected[1, 8] += 2
    expected[0, 11] = -np.inf
    for row, (hist, plen) in enumerate(zip(history, [2, 1, 0])):
        real = [h for h in hist if h < V]
        rep = [1.5, 1.0, 2.0][row]
        for tok in set(real):
            x = expected[row, tok]
            expected[row, tok] = x / rep if x > 0 else x * rep
        counts = np.bincount(real[plen:], minlength=V)
        expected[row] -= [0.5, 0.25, 0.0][row] * counts + [0.3, 1.0, 0.0][row] * (counts > 0)
    np.testing.assert_allclose(sampler.apply_penalties(jnp.asarray(logits), t), expected, rtol=1e-6)


def _numpy_allowed(row, temperature, top_k, top_p, min_p):
    z = row / temperature
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    allowed = probs >= min_p * probs.max()
    order = np.argsort(-np.where(allowed, z, -np.inf), kind="stable")
    kept = np.zeros(V, bool)
    kept[order[:top_k]] = True
    kept &= allowed
    p = np.where(kept, probs, 0) / np.where(kept, probs, 0).sum()
    mass_before = 0.0
    final = np.zeros(V, bool)
    for tok in order:
        if kept[tok] and (mass_before < top_p or not final.any()):
            final[tok] = True
        mass_before += p[tok] if kept[tok] else 0
    return final


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 3, 1.0, 0.0), (0.7, V, 0.5, 0.0), (1.3, V, 1.0, 0.2), (1.0, 5, 0.8, 0.05), (1.0, 1, 1.0, 0.0)])
def test_truncation_keeps_exactly_the_numpy_set(logits, temperature, top_k, top_p, min_p):
    t = _tensors(3, temperature=[temperature] * 3, top_k=[top_k] * 3, top_p=[top_p] * 3,
                 min_p=[min_p] * 3)
    truncated = np.asarray(sampler._truncate(jnp.asarray(logits) / temperature, t))
    for row in range(3):
        expected = _numpy_allowed(logits[row], temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(truncated[row]), expected)


def test_random_sampling_follows_the_softmax_distribution():
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4), np.float32))
    n = 4000
    t = _tensors(n, seeds=np.arange(n))
    out = sample(jnp.asarray(np.tile(row, (n, 1))), t, all_greedy=False, with_logprobs=False)
    freq = np.bincount(np.asarray(out.token_ids), minlength=V) / n
    np.testing.assert_allclose(freq[:4], [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_a_rows_sample_depends_only_on_its_seed_and_output_length(logits):
    batch = np.concatenate([logits, logits[::-1]])
    t1 = _tensors(6, seeds=[7, 8, 9, 10, 11, 7], output_lens=[3, 0, 0, 0, 0, 3])
    out = sample(jnp.asarray(batch), t1, all_greedy=False, with_logprobs=False)
    alone = sample(jnp.asarray(logits[:1]), _tensors(1, seeds=[7], output_lens=[3]),
                   all_greedy=False, with_logprobs=False)
    assert out.token_ids[0] == out.token_ids[5] == alone.token_ids[0]


def test_logprobs_are_of_the_raw_logits(logits):
    out = sample(jnp.asarray(logits), None, all_greedy=True, with_logprobs=True)
    ref = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(3), logits.argmax(-1)], rtol=1e-6)
    np.testing.assert_array_equal(out.ranks, [1, 1, 1])
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, axis=-1))
    np.testing.assert_allclose(out.top_logprobs, np.sort(np.asarray(ref), axis=-1)[:, ::-1], rtol=1e-6)


def test_a_token_bitmask_limits_greedy_and_random_rows_and_their_logprobs(logits):
    from jaxserve.runner.token_bitmask import pack_token_bitmask

    allowed = np.zeros((3, V), bool)
    allowed[0, [1, 4]] = allowed[1, [2, 3, 9]] = True
    allowed[2] = True  # unconstrained
    t = dataclasses.replace(_tensors(3, temperature=[0.0, 1.0, 0.0]),
                            token_bitmask=jnp.asarray(pack_token_bitmask(allowed)))
    for seed in range(5):
        t = dataclasses.replace(t, seeds=jnp.full(3, seed, jnp.uint32))
        out = sample(jnp.asarray(logits), t, all_greedy=False, with_logprobs=True)
        ids = np.asarray(out.token_ids)
        assert ids[0] == np.where(allowed[0], logits[0], -np.inf).argmax()
        assert allowed[1, ids[1]] and ids[2] == logits[2].argmax()
        assert np.isfinite(out.logprobs).all()
        assert allowed[0, np.asarray(out.top_ids)[0, :2]].all()  # -inf for the others
        assert np.isneginf(np.asarray(out.top_logprobs)[0, 2:]).all()
