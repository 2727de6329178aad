"""Structured outputs through the whole engine: random weights, so only the grammar can make
the outputs valid. JSON schemas validate, regexes fullmatch, choices are choices; greedy and
sampled, n > 1, logprobs, stop strings, async scheduling, preemption; no compilation."""

import dataclasses
import json
import re

import jsonschema
import pytest

from jaxserve import SamplingParams, StructuredOutputsParams
from jaxserve.testing import forbid_compilation
from jaxserve.testing.hf_reference import random_prompts

SCHEMAS = [
    {  # nested object
        "type": "object", "additionalProperties": False, "required": ["user"],
        "properties": {"user": {
            "type": "object", "additionalProperties": False, "required": ["id", "active"],
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                           "active": {"type": "boolean"}}}}},
    {  # array of bounded integers
        "type": "array", "minItems": 1, "maxItems": 4,
        "items": {"type": "integer", "minimum": -5, "maximum": 5}},
    {  # enums
        "type": "object", "additionalProperties": False, "required": ["color", "size"],
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L"]}}},
    {  # required fields, an optional one, bounded strings and integers
        "type": "object", "additionalProperties": False, "required": ["name", "age"],
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 6},
                       "age": {"type": "integer", "minimum": 18, "maximum": 99},
                       "note": {"type": "string", "maxLength": 4}}},
]
PROMPTS = ["Hello, world!", "The quick brown fox", "Numbers: 0 1 2", "Paged attention"]


def _json(schema):
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


def _generate(llm, prompts, params):
    with forbid_compilation():
        return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_parse_and_validate(qwen2_llm, temperature):
    params = [SamplingParams(temperature=temperature, seed=i, n=2, max_tokens=120,
                             structured_outputs=_json(schema))
              for i, schema in enumerate(SCHEMAS)]
    outputs = _generate(qwen2_llm, PROMPTS, params)
    for schema, output in zip(SCHEMAS, outputs):
        assert len(output.outputs) == 2
        for sample in output.outputs:
            assert sample.finish_reason == "stop", sample.text
            jsonschema.validate(json.loads(sample.text), schema)
    if temperature == 0.0:  # greedy children agree with each other and with a rerun
        assert all(o.outputs[0].text == o.outputs[1].text for o in outputs)
        again = _generate(qwen2_llm, PROMPTS, params)
        assert [o.outputs[0].text for o in again] == [o.outputs[0].text for o in outputs]


def test_json_object_regex_choice_and_lark_grammar(qwen2_llm):
    regex = r"[a-z]{2,6}@[a-z]{3}\.(com|org)"
    choices = ["yes", "no", "maybe later"]
    grammar = 'start: "(" item ("," item)~0..3 ")"\nitem: /[0-9]{1,2}/ | "x"'
    specs = [StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
             StructuredOutputsParams(regex=regex), StructuredOutputsParams(choice=choices),
             StructuredOutputsParams(grammar=grammar)]
    checks = [lambda text: isinstance(json.loads(text), dict),
              lambda text: re.fullmatch(regex, text),
              lambda text: text in choices,
              lambda text: re.fullmatch(r"\((\d{1,2}|x)(,(\d{1,2}|x)){0,3}\)", text)]
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature, n=3, seed=5, max_tokens=60,
                                 structured_outputs=spec) for spec in specs]
        outputs = _generate(qwen2_llm, PROMPTS, params)
        for i, (check, output) in enumerate(zip(checks, outputs)):
            for sample in output.outputs:
                if i == 0 and sample.finish_reason == "length":  # keys have no length cap
                    assert sample.text.startswith("{")
                    continue
                assert check(sample.text) and sample.finish_reason == "stop", sample.text


@pytest.mark.parametrize("spec, message", [
    (StructuredOutputsParams(json={"type": "objectx"}), "invalid json: .*objectx"),
    (StructuredOutputsParams(json="{not json"), "invalid json"),
    (StructuredOutputsParams(regex="a(b"), "invalid regex: .*unclosed group"),
    (StructuredOutputsParams(grammar="start: foo"), "invalid grammar: .*foo"),
])
def test_an_invalid_spec_is_a_value_error_from_add_request(qwen2_llm, spec, message):
    engine = qwen2_llm.llm_engine
    with pytest.raises(ValueError, match=f"(?s)^structured_outputs: {message}"):
        engine.add_request(None, [5, 6, 7], SamplingParams(structured_outputs=spec))
    assert not engine.has_unfinished_requests() and len(engine.structured_outputs) == 0


def test_logprobs_and_stop_strings_with_a_grammar(qwen2_llm):
    regex = r"[a-z]{3}-[a-z]{3}-[a-z]{3}"
    params = SamplingParams(temperature=0.0, max_tokens=40, logprobs=2, stop=["-"],
                            structured_outputs=StructuredOutputsParams(regex=regex))
    sample = _generate(qwen2_llm, PROMPTS[:1], params)[0].outputs[0]
    assert re.fullmatch("[a-z]{3}", sample.text) and sample.stop_reason == "-"
    for token_id, position in zip(sample.token_ids, sample.logprobs):
        assert position[token_id].rank == 1 and position[token_id].logprob > float("-inf")


def test_constrained_requests_run_ahead_beside_unconstrained_ones(qwen2_llm):
    # planned ahead, a constrained step's sampler waits for the matchers to take the
    # tokens before; the outputs are those of synchronous steps
    engine = qwen2_llm.llm_engine
    prompts = [{"prompt_token_ids": p} for p in random_prompts([9, 30, 17], seed=3)]
    plain = SamplingParams(temperature=1.0, seed=4, max_tokens=12, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=60,
                                 structured_outputs=_json(SCHEMAS[2]))
    results, aheads = [], []
    runner, manager, schedule = engine.runner, engine.structured_outputs, engine.scheduler.schedule
    dispatch, sample, prepare_step = runner.dispatch, runner.sample, manager.prepare_step
    for async_scheduling in (False, True):
        engine.async_scheduling = async_scheduling
        calls, events = [], []
        engine.scheduler.schedule = lambda **k: calls.append(k.get("ahead")) or schedule(**k)
        runner.dispatch = lambda *a, **k: events.append(
            ("forward", k.get("defer_sampling", False))) or dispatch(*a, **k)
        runner.sample = lambda *a: events.append(("sampler", True)) or sample(*a)
        manager.prepare_step = lambda out: (lambda filled: events.append(
            ("fill", filled.grammar_bitmask is not None)) or filled)(prepare_step(out))
        try:
            outputs = _generate(qwen2_llm, prompts, [plain, constrained, plain])
        finally:
            engine.async_scheduling = True
            del engine.scheduler.schedule, runner.dispatch, runner.sample, manager.prepare_step
        results.append([o.outputs[0].token_ids for o in outputs])
        aheads.append(sum(bool(a) for a in calls))
        jsonschema.validate(json.loads(outputs[1].outputs[0].text), SCHEMAS[2])
        # every mask is filled while its step's forward runs: after the forward is
        # launched without its sampler, before that sampler
        fills = [i for i, e in enumerate(events) if e == ("fill", True)]
        assert len(fills) >= len(results[-1][1]) - 1
        for i in fills:
            assert events[i - 1:i + 2:2] == [("forward", True), ("sampler", True)]
    assert results[0] == results[1]
    assert aheads[0] == 0 and aheads[1] >= len(results[1][1]) - 2


def test_a_preempted_request_resumes_on_its_matcher(qwen2_llm):
    engine = qwen2_llm.llm_engine
    prompts = random_prompts([30, 35], seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=_json(SCHEMAS[0]))
    expected = _generate(qwen2_llm, [{"prompt_token_ids": p} for p in prompts], params)
    req_ids = [engine.add_request(None, p, params) for p in prompts]
    finished = {}
    engine.async_scheduling = False  # steps in sync: the test preempts between two of them
    try:
        with forbid_compilation():
            for step in range(200):
                if step == 8:  # recompute both from their tokens so far (no step in flight)
                    assert engine._in_flight is None and len(engine.scheduler.running) == 2
                    for request in list(engine.scheduler.running.values()):
                        assert request.num_output_tokens > 0
                        engine.scheduler._preempt(request)
                finished.update((o.request_id, o) for o in engine.step() if o.finished)
                if not engine.has_unfinished_requests():
                    break
    finally:
        engine.async_scheduling = True
    for req_id, output in zip(req_ids, expected):
        assert finished[req_id].outputs[0].token_ids == output.outputs[0].token_ids
        jsonschema.validate(json.loads(finished[req_id].outputs[0].text), SCHEMAS[0])


@pytest.mark.slow
def test_preemption_keeps_each_matcher_on_its_tokens(engine_checkpoint, engine_kwargs,
                                                     qwen2_llm):
    from jaxserve import LLM

    llm = LLM(str(engine_checkpoint("qwen2")), **{
        **engine_kwargs, "max_num_batched_tokens": 32, "num_gpu_blocks_override": 12,
        "max_num_seqs": 8, "max_model_len": 128})
    prompts = [{"prompt_token_ids": p} for p in random_prompts([30, 35, 40, 28, 33], seed=7)]
    params = [SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True,
                             structured_outputs=_json(SCHEMAS[i % 2 * 3])) for i in range(5)]
    outputs = _generate(llm, prompts, params)
    assert llm.get_metrics()["num_preemptions"] > 0
    for param, output in zip(params, outputs):
        jsonschema.validate(json.loads(output.outputs[0].text),
                            json.loads(param.structured_outputs.grammar_spec()[1]))
    alone = _generate(qwen2_llm, prompts, params)  # no preemption: the same greedy tokens
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in alone]


@pytest.mark.slow
def test_tensor_parallel_constrained_rows_match_one_device(engine_checkpoint, engine_kwargs,
                                                           qwen2_llm):
    from jaxserve import LLM

    llm = LLM(str(engine_checkpoint("qwen2")), **{**engine_kwargs, "tensor_parallel_size": 2})
    greedy = [SamplingParams(temperature=0.0, max_tokens=120, structured_outputs=_json(schema))
              for schema in SCHEMAS]
    sampled = dataclasses.replace(greedy[0], temperature=1.0, seed=5)  # the masked sampler
    for params in (greedy, greedy[:3] + [sampled]):
        outputs = _generate(llm, PROMPTS, params)
        for param, output in zip(params, outputs):
            jsonschema.validate(json.loads(output.outputs[0].text),
                                json.loads(param.structured_outputs.grammar_spec()[1]))
    alone = _generate(qwen2_llm, PROMPTS, greedy)
    assert [o.outputs[0].token_ids for o in _generate(llm, PROMPTS, greedy)] == [
        o.outputs[0].token_ids for o in alone]


def _manager(vocab_size=336, **kwargs):  # the test tokenizer has 320 tokens, EOS id 0
    from jaxserve.engine.structured_outputs import StructuredOutputs
    from jaxserve.testing.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(320)
    return tokenizer, StructuredOutputs(tokenizer, vocab_size=vocab_size, eos_token_ids=[0],
                                        **kwargs)


def _allowed(manager, req_id, finished=()):
    from jaxserve.core.scheduler_output import SchedulerOutput
    from jaxserve.runner.token_bitmask import unpack_token_bitmask

    out = manager.prepare_step(SchedulerOutput(
        (), (), {req_id: 1}, 1, frozenset([req_id]), frozenset(finished), frozenset()))
    assert out.structured_output_req_ids == (req_id,)
    return set(unpack_token_bitmask(out.grammar_bitmask, 336)[0].nonzero()[0].tolist())


def test_eos_only_where_the_grammar_may_end_and_never_ids_past_the_tokenizer():
    from jaxserve.request import Request

    tokenizer, manager = _manager()
    x, y = tokenizer.convert_tokens_to_ids(["x", "y"])
    request = Request("r", [5], SamplingParams())
    manager.add(request, manager.compile(StructuredOutputsParams(regex="xy?")))
    first = _allowed(manager, "r")
    assert x in first and 0 not in first and y not in first and max(first) < 320
    request.append_output_token_ids(x)
    assert not manager.accept("r", [x])  # may end or go on
    assert {0, y} <= _allowed(manager, "r")
    request.append_output_token_ids(y)
    assert manager.accept("r", [y])  # complete: only EOS is left
    assert _allowed(manager, "r") == {0}


def test_a_matcher_behind_its_requests_tokens_is_rebuilt_from_them():
    from jaxserve.core.scheduler_output import SchedulerOutput
    from jaxserve.request import Request, RequestStatus

    tokenizer, manager = _manager()
    x, y = tokenizer.convert_tokens_to_ids(["x", "y"])
    grammar = manager.compile(StructuredOutputsParams(regex="xy?"))
    assert manager.compile(StructuredOutputsParams(regex="xy?")) is grammar  # cached
    request = Request("r", [5], SamplingParams())
    manager.add(request, grammar)
    request.append_output_token_ids([x, y])  # tokens the matcher never saw
    assert _allowed(manager, "r") == {0}
    request.status = RequestStatus.FINISHED_STOPPED  # and its id is taken by a new one:
    again = Request("r", [5], SamplingParams())
    manager.add(again, grammar)
    assert x in _allowed(manager, "r", finished=["r"])  # the new one keeps its matcher
    again.status = RequestStatus.FINISHED_ABORTED
    manager.prepare_step(SchedulerOutput((), (), {}, 0, frozenset(), frozenset(["r"]),
                                         frozenset()))
    assert len(manager) == 0


@pytest.mark.parametrize("parallel_fill", [False, True])
def test_each_row_is_filled_whole_from_its_own_matcher(parallel_fill):
    # on the engine thread one row after another (CPU backends), or in llguidance's pool
    from jaxserve.core.scheduler_output import SchedulerOutput
    from jaxserve.request import Request
    from jaxserve.runner.token_bitmask import unpack_token_bitmask

    tokenizer, manager = _manager(parallel_fill=parallel_fill)
    x, y = tokenizer.convert_tokens_to_ids(["x", "y"])
    grammar = manager.compile(StructuredOutputsParams(regex="xy?x?"))
    for req_id, tokens in (("a", []), ("b", [x]), ("c", [x, y])):
        request = Request(req_id, [5], SamplingParams())
        manager.add(request, grammar)
        request.append_output_token_ids(tokens)
        manager.accept(req_id, tokens)
    scheduled = {"u": 1, "c": 1, "a": 1, "b": 1}  # "u" is unconstrained
    out = SchedulerOutput((), (), scheduled, 4, frozenset(scheduled), frozenset(), frozenset())
    assert manager.constrains(out) and not manager.constrains(dataclasses.replace(
        out, num_scheduled_tokens={"u": 1}, total_num_scheduled_tokens=1))
    out = manager.prepare_step(out)
    assert out.structured_output_req_ids == ("c", "a", "b")
    allowed = unpack_token_bitmask(out.grammar_bitmask, 336)
    assert [set(row.nonzero()[0].tolist()) for row in allowed] == [{0, x}, {x}, {0, x, y}]
