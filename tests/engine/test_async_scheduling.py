"""Async scheduling through the whole engine: each step planned and launched while the one
before computes gives exactly the outputs of synchronous steps, for every sampling feature
(penalties included: their steps' samplers wait for the tokens before), survives aborts
mid-flight and never compiles."""

import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.runner.model_runner import PendingStep
from jaxserve.testing import forbid_compilation
from jaxserve.testing.hf_reference import random_prompts


@pytest.fixture()
def engine(qwen2_llm):
    engine = qwen2_llm.llm_engine
    calls = {"ahead": 0, "sync": 0}
    schedule = engine.scheduler.schedule

    def counted(*, ahead=False, **kwargs):
        calls["ahead" if ahead else "sync"] += 1
        return schedule(ahead=ahead, **kwargs)

    engine.scheduler.schedule = counted
    engine.calls = calls
    yield engine
    engine.async_scheduling = True
    del engine.scheduler.schedule, engine.calls


def _run(llm, engine, prompts, params, *, async_scheduling):
    engine.async_scheduling = async_scheduling
    with forbid_compilation():
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
    return [[(tuple(s.token_ids), s.text, s.finish_reason, s.stop_reason,
              None if s.logprobs is None else [sorted(d) for d in s.logprobs])
             for s in o.outputs] + [o.prompt_logprobs is not None] for o in outputs]


def _mixed_params(tokenizer):
    return [
        SamplingParams(temperature=0.0, max_tokens=20),  # may end on EOS
        SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=15, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, seed=12, max_tokens=12, logprobs=2),
        SamplingParams(n=2, temperature=1.0, seed=13, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                       stop=[tokenizer.decode([40])[-1:] or "a"]),
        SamplingParams(temperature=0.0, max_tokens=6, min_tokens=4, prompt_logprobs=1),
        SamplingParams(temperature=1.0, seed=14, max_tokens=1),
    ]


def test_async_steps_give_the_outputs_of_synchronous_steps(qwen2_llm, engine):
    params = _mixed_params(qwen2_llm.get_tokenizer())
    prompts = random_prompts([5, 40, 17, 3, 64, 30, 12, 90], seed=21)
    sync = _run(qwen2_llm, engine, prompts, params, async_scheduling=False)
    assert engine.calls["ahead"] == 0
    asynchronous = _run(qwen2_llm, engine, prompts, params, async_scheduling=True)
    assert engine.calls["ahead"] > 10
    assert asynchronous == sync


def test_requests_with_penalties_run_ahead_with_the_same_outputs(qwen2_llm, engine):
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                             presence_penalty=1.5, repetition_penalty=1.3),
              SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True,
                             frequency_penalty=0.7, logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)]
    prompts = random_prompts([20, 25, 7], seed=22)
    sync = _run(qwen2_llm, engine, prompts, params, async_scheduling=False)
    engine.calls.update(ahead=0, sync=0)
    deferred = []
    sample = engine.runner.sample
    engine.runner.sample = lambda *a, **k: deferred.append(1) or sample(*a, **k)
    try:
        asynchronous = _run(qwen2_llm, engine, prompts, params, async_scheduling=True)
    finally:
        del engine.runner.sample
    assert asynchronous == sync
    # every step after the first was planned ahead; while a penalized request ran, its
    # step's sampler waited for the tokens of the step before
    assert engine.calls["sync"] <= 3 and engine.calls["ahead"] >= 27
    assert len(deferred) >= 18


def test_aborting_mid_flight_leaves_the_other_requests_intact(qwen2_llm, engine):
    prompts = random_prompts([33, 21, 50], seed=23)
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    alone = _run(qwen2_llm, engine, prompts[::2], params, async_scheduling=False)
    engine.async_scheduling = True
    for i, prompt in enumerate(prompts):
        engine.add_request(f"abort-{i}", prompt, params)
    finished = {}
    with forbid_compilation():
        for step in range(200):
            if step == 6:
                in_flight = engine._in_flight  # a step is in flight as it goes
                assert isinstance(in_flight, PendingStep) and in_flight.out.num_reqs > 0
                engine.abort_request("abort-1")
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = tuple(out.outputs[0].token_ids)
            if not engine.has_unfinished_requests():
                break
    assert "abort-1" not in finished
    assert [finished["abort-0"], finished["abort-2"]] == [a[0][0] for a in alone]
    assert engine.scheduler.kv_cache_manager.usage == 0.0
