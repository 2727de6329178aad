"""Sampling through the whole engine: seeds, n, logprobs, stop strings, text, no recompiles."""

import math

import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.testing import forbid_compilation
from jaxserve.testing.hf_reference import random_prompts


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(qwen2_llm):
    target = random_prompts([20], seed=5)[0]
    others = random_prompts([3, 40, 17, 64], seed=6)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    noise = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    alone = _tokens(qwen2_llm.generate(_ids([target]), params, use_tqdm=False))[0]
    batched = qwen2_llm.generate(_ids(others[:2] + [target] + others[2:]),
                                 [noise, noise, params, noise, noise], use_tqdm=False)
    reordered = qwen2_llm.generate(_ids([target] + others[::-1]), [params] + [noise] * 4,
                                   use_tqdm=False)
    assert _tokens(batched)[2] == alone == _tokens(reordered)[0]


def test_n_samples_with_a_seed_give_n_distinct_reproducible_outputs(qwen2_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    prompt = _ids(random_prompts([50], seed=8))
    first = qwen2_llm.generate(prompt, params, use_tqdm=False)[0]
    again = qwen2_llm.generate(prompt, params, use_tqdm=False)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    samples = [tuple(o.token_ids) for o in first.outputs]
    assert len(set(samples)) == 3 and all(len(s) == 12 for s in samples)
    assert samples == [tuple(o.token_ids) for o in again.outputs]


def test_logprobs_count_and_consistency(qwen2_llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    prompt = random_prompts([21], seed=9)[0]
    out = qwen2_llm.generate(_ids([prompt]), params, use_tqdm=False)[0]
    sample = out.outputs[0]
    assert len(sample.logprobs) == 6
    for token_id, position in zip(sample.token_ids, sample.logprobs):
        assert token_id in position and position[token_id].rank == 1  # greedy: the top token
        assert 3 <= len(position) <= 4
        assert all(lp.logprob <= 0 for lp in position.values())
    assert math.isclose(sample.cumulative_logprob,
                        sum(p[t].logprob for t, p in zip(sample.token_ids, sample.logprobs)),
                        rel_tol=1e-5)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for token_id, position in zip(prompt[1:], out.prompt_logprobs[1:]):
        assert token_id in position and 2 <= len(position) <= 3


def test_stop_string_split_across_tokens_ends_the_output(qwen2_llm):
    tokenizer = qwen2_llm.get_tokenizer()
    prompt = _ids(random_prompts([30], seed=10))
    base = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    free = qwen2_llm.generate(prompt, base, use_tqdm=False)[0].outputs[0]
    pieces = [tokenizer.decode([t]) for t in free.token_ids]
    # A stop string made of the end of token 5 and the start of token 6 (non-empty pieces).
    i = next(i for i in range(4, 20) if pieces[i].strip() and pieces[i + 1].strip()
             and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[i][-1] + pieces[i + 1][0]
    expected = free.text[:free.text.index(stop)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    out = qwen2_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (expected, "stop", stop)
    # The engine sees the stop string a step or two late (pipelined output processing, async
    # scheduling): the tokens those steps sampled are dropped, the output ends with the
    # token completing the string.
    assert list(out.token_ids) == list(free.token_ids[:i + 2])
    kept = qwen2_llm.generate(prompt, SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
        include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == expected + stop


def test_output_text_is_the_full_decode_including_multibyte_characters(qwen2_llm):
    tokenizer = qwen2_llm.get_tokenizer()
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)
    outs = qwen2_llm.generate(_ids(random_prompts([8] * 12, seed=11)), params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    for out, text in zip(outs, texts):
        assert text == tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    assert any(ord(ch) > 127 and ch != "\ufffd" for text in texts for ch in text)


def test_max_tokens_and_eos_finish_reasons(qwen2_llm):
    out = qwen2_llm.generate(_ids(random_prompts([10], seed=12)),
                             SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0]
    sample = out.outputs[0]
    assert out.finished and sample.finish_reason in ("length", "stop")
    if sample.finish_reason == "length":
        assert len(sample.token_ids) == 5


def test_random_workload_never_compiles_after_warm_up(qwen2_llm):
    rng = np.random.default_rng(13)
    prompts = random_prompts(rng.integers(1, 200, size=200).tolist(), seed=14)
    choices = [
        lambda: dict(temperature=0.0),
        lambda: dict(temperature=0.8, top_k=int(rng.integers(1, 50)), top_p=0.9),
        lambda: dict(temperature=1.2, min_p=0.05, seed=int(rng.integers(1000))),
        lambda: dict(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3,
                     repetition_penalty=1.2),
        lambda: dict(temperature=0.0, logprobs=2, logit_bias={5: 3.0, 9: -2.0}),
        lambda: dict(temperature=1.0, min_tokens=3, n=2),
        lambda: dict(temperature=0.0, prompt_logprobs=1, stop=["a", "e"]),
    ]
    params = [SamplingParams(max_tokens=int(rng.integers(3, 20)), **choices[i % len(choices)]())
              for i in range(200)]
    with forbid_compilation():
        outs = qwen2_llm.generate(_ids(prompts), params, use_tqdm=False)
    assert len(outs) == 200 and all(o.finished for o in outs)
    assert qwen2_llm.get_metrics()["kv_cache_usage"] == 0.0


def test_logit_bias_and_min_tokens_steer_generation(qwen2_llm):
    eos = qwen2_llm.get_tokenizer().eos_token_id
    prompt = _ids(random_prompts([12], seed=15))
    forced = qwen2_llm.generate(prompt, SamplingParams(
        temperature=0.0, max_tokens=5, ignore_eos=True, logit_bias={42: 100.0}), use_tqdm=False)
    assert forced[0].outputs[0].token_ids == [42] * 5
    eager_eos = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4,
                               logit_bias={eos: 100.0})
    sample = qwen2_llm.generate(prompt, eager_eos, use_tqdm=False)[0].outputs[0]
    assert sample.token_ids[4] == eos and eos not in sample.token_ids[:4]
    assert sample.finish_reason == "stop" and len(sample.token_ids) == 5


def test_n_samples_share_the_prompt_blocks_through_the_prefix_cache(qwen2_llm):
    prompt = _ids(random_prompts([80], seed=16))  # 5 full blocks of 16
    before = qwen2_llm.get_metrics()["prefix_cache_hits"]
    qwen2_llm.generate(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=4),
                       use_tqdm=False)
    # Samples 1 and 2 hit 4 blocks each: a hit never covers the last prompt token's block.
    assert qwen2_llm.get_metrics()["prefix_cache_hits"] - before == 2 * 64


def test_extreme_but_valid_parameters_do_not_break_the_engine(qwen2_llm):
    prompt = _ids(random_prompts([6], seed=17))
    params = SamplingParams(temperature=1.0, top_k=10**12, min_tokens=2, max_tokens=4,
                            stop_token_ids=[10**9], seed=1)
    out = qwen2_llm.generate(prompt, params, use_tqdm=False)[0]
    assert out.finished and len(out.outputs[0].token_ids) >= 2


def test_the_runner_hands_over_consistent_logprob_records(qwen2_llm, monkeypatch):
    from jaxserve.core.scheduler_output import TokenLogprobs

    engine, seen = qwen2_llm.llm_engine, []
    process = engine.output_processor.process
    monkeypatch.setattr(engine.output_processor, "process",
                        lambda updates, runner_out: (seen.append((updates, runner_out)),
                                                     process(updates, runner_out))[1])
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=5, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    prompt = random_prompts([19], seed=4)[0]
    qwen2_llm.generate(_ids([prompt]), params, use_tqdm=False)
    sampled = [(u.new_token_ids, out.logprobs[u.req_id]) for us, out in seen for u in us]
    prompt_records = [r for _, out in seen for rs in (out.prompt_logprobs or {}).values()
                      for r in rs]
    for records, wanted_k in [([r for _, rs in sampled for r in rs], 3), (prompt_records, 2)]:
        for r in records:
            assert isinstance(r, TokenLogprobs) and r.rank >= 1 and r.logprob <= 0
            assert len(r.top_ids) == len(r.top_logprobs) == wanted_k
            assert list(r.top_logprobs) == sorted(r.top_logprobs, reverse=True)
            assert r.logprob <= r.top_logprobs[0] + 1e-6
            if r.rank <= wanted_k:
                assert math.isclose(r.logprob, r.top_logprobs[r.rank - 1], abs_tol=1e-5)
    assert [ids for ids, _ in sampled] == [(r.token_id,) for _, [r] in sampled]
    assert len(sampled) == 5
    assert [r.token_id for r in prompt_records] == list(prompt[1:])
