"""benchmarks/quant_scoring.py: sequences packed into the engine's own forward steps give each
sequence's hidden states as if it ran alone, and the LM head's chunked reductions equal
numpy's over the whole logits."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def scoring(import_benchmarks):
    return import_benchmarks("quant_scoring").quant_scoring


def test_pack_keeps_whole_sequences_in_order_under_every_budget(scoring):
    # tokens <= 40, sequences <= 2, blocks of 16 <= 4 per step
    assert scoring._pack([10, 20, 5, 40, 16, 17], 40, 2, 16, 4) == [[0, 1], [2], [3], [4, 5]]
    assert scoring._pack([16, 17], 40, 2, 16, 2) == [[0], [1]]  # 3 blocks > 2
    assert scoring._pack([16, 16, 16, 16, 1], 64, 8, 16, 4) == [[0, 1, 2, 3], [4]]
    with pytest.raises(ValueError, match="41 tokens"):
        scoring._pack([41], 40, 2, 16, 4)


def test_step_inputs_lay_each_sequence_from_position_zero_in_its_own_blocks(scoring):
    inputs = scoring._step_inputs([[5, 6, 7], [8, 9]], token_buckets=(4, 8),
                                  seq_buckets=(4,), block_size=2, max_blocks=3)
    assert inputs["input_ids"].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert inputs["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    # sequence 0 in blocks 1, 2; sequence 1 in block 3; padding tokens in the null block 0
    assert inputs["slot_mapping"].tolist() == [2, 3, 4, 6, 7, 1, 0, 1]
    assert inputs["block_tables"].tolist() == [[1, 2, 0], [3, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert inputs["seq_lens"].tolist() == [3, 2, 0, 0]
    assert inputs["query_start_loc"].tolist() == [0, 3, 5, 5, 5]
    assert inputs["logits_indices"].tolist() == [2, 4, 0, 0]


def test_agreement_counts_equal_tokens_and_the_prefix_before_the_first_difference(scoring):
    same, prefix = scoring.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 0, 4], [5, 6, 7, 8]])
    assert (same, prefix) == ((3 / 4 + 1) / 2, (2 / 4 + 1) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_packed_scoring_equals_each_sequence_alone(scoring, tiny_checkpoint, kv_cache_dtype):
    import jax.numpy as jnp
    from flax import nnx

    from jaxserve import LLM
    from jaxserve.runner.kv_cache import layer_pools
    from jaxserve.testing.engine_step import engine_step
    from jaxserve.testing.metadata import one_sequence

    llm = LLM(str(tiny_checkpoint("qwen2")), dtype="float32", max_num_seqs=8,
              max_model_len=64, max_num_batched_tokens=64, skip_tokenizer_init=True,
              background_compilation=False, progress=False, kv_cache_dtype=kv_cache_dtype)
    runner = llm.llm_engine.runner
    rng = np.random.default_rng(0)
    lengths = [7, 30, 64, 1, 20, 33]  # several steps, several sequences a step
    sequences = [rng.integers(0, runner.model_config.vocab_size, n).tolist() for n in lengths]
    rows = [np.arange(n) for n in lengths[:-1]] + [np.arange(5, 12)]  # all, or a middle part
    hidden = scoring.final_hidden(llm, sequences, rows)
    head = scoring.LMHead(llm)

    step = engine_step(nnx.merge(runner.graphdef, runner.params), all_token_logits=True)
    layer = layer_pools(runner.model_config, 5, 16, runner.kv_spec.kv_dtype)
    for seq, keep, got in zip(sequences, rows, hidden):
        pools = tuple(tuple(jnp.zeros(shape, dtype) for shape, dtype in layer)
                      for _ in range(runner.model_config.num_layers))
        width = 64  # one program for every length; causal: padding leaves earlier rows alone
        ids = jnp.asarray(seq + [0] * (width - len(seq)), jnp.int32)
        alone, _ = step(pools, ids, jnp.arange(width, dtype=jnp.int32), one_sequence(width))
        alone = np.asarray(alone)[keep]  # [n, V]
        packed = np.concatenate([np.asarray(logits)[:n] for n, logits in head.chunks(got)])
        np.testing.assert_allclose(packed, alone, rtol=1e-4, atol=1e-4)

    # the reductions: against themselves nothing differs; log-probs are log_softmax's
    everything = np.concatenate(hidden)
    same = scoring.compare(head, head, everything, everything)
    assert same.same_argmax.all() and not same.max_abs_diff.any()
    logits = np.concatenate([np.asarray(x)[:n] for n, x in head.chunks(everything)])
    np.testing.assert_allclose(same.max_abs_ref, np.abs(logits).max(-1), rtol=1e-6)
    top2 = np.sort(logits, -1)[:, -2:]
    np.testing.assert_allclose(same.ref_margin, top2[:, 1] - top2[:, 0], rtol=1e-5, atol=1e-6)
    targets = rng.integers(0, logits.shape[1], len(logits))
    log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    np.testing.assert_allclose(head.log_probs(everything, targets),
                               log_softmax[np.arange(len(logits)), targets], rtol=1e-5,
                               atol=1e-5)
