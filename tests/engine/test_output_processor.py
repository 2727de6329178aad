"""OutputProcessor: the runner's `TokenLogprobs` records become vLLM's per-position dicts."""

from jaxserve import SamplingParams
from jaxserve.core.scheduler_output import ModelRunnerOutput, RequestUpdate, TokenLogprobs
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.outputs import Logprob


def test_logprob_records_become_position_dicts_and_the_cumulative_logprob():
    processor = OutputProcessor(tokenizer=None)
    params = SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=1)
    processor.add("p", None, [1, 2, 3], ["p"], params)
    sampled = TokenLogprobs(token_id=5, logprob=-2.0, rank=3, top_ids=(1, 2, 5),
                            top_logprobs=(-0.1, -0.5, -2.0))
    prompt = [TokenLogprobs(2, -1.0, 1, (2,), (-1.0,)), TokenLogprobs(3, -4.0, 2, (7,), (-0.2,))]
    runner_out = ModelRunnerOutput({"p": [5]}, logprobs={"p": [sampled]},
                                   prompt_logprobs={"p": prompt})
    [out], stopped = processor.process([RequestUpdate("p", (5,), False, None, None)], runner_out)
    assert stopped == []
    # the scored token first, then the top ones; a top id equal to it keeps its own rank
    assert out.outputs[0].logprobs == [{5: Logprob(-2.0, 3), 1: Logprob(-0.1, 1),
                                        2: Logprob(-0.5, 2)}]
    assert list(out.outputs[0].logprobs[0]) == [5, 1, 2]
    assert out.outputs[0].cumulative_logprob == -2.0
    assert out.prompt_logprobs == [None, {2: Logprob(-1.0, 1)},
                                   {3: Logprob(-4.0, 2), 7: Logprob(-0.2, 1)}]


def test_a_request_whose_detokenizer_raises_fails_alone():
    from jaxserve.core.faults import FaultInjector, FaultSpec, InjectedFault
    from jaxserve.testing.tokenizer import build_tokenizer

    processor = OutputProcessor(build_tokenizer(), faults=FaultInjector(
        FaultSpec("detokenize", "raise", 3)))
    params = SamplingParams(max_tokens=4, n=2)
    processor.add("p", "hi", [1, 2], ["0_p", "1_p"], params)
    processor.add("q", "hi", [1, 2], ["q"], SamplingParams(max_tokens=4, stop=["zz"]))
    step = [RequestUpdate(i, (40,), False, None, None) for i in ("0_p", "1_p", "q")]
    outputs, stopped = processor.process(step, ModelRunnerOutput({}))
    assert [o.request_id for o in outputs] == ["p"] and stopped == []
    failed = processor.pop_failed()
    assert list(failed) == ["q"] and failed["q"].child_ids == ["q"]
    assert isinstance(failed["q"].error, InjectedFault) and not processor.has("q")
    outputs, _ = processor.process([RequestUpdate("0_p", (41,), False, None, None)],
                                   ModelRunnerOutput({}))
    assert len(outputs[0].outputs[0].token_ids) == 2 and processor.pop_failed() == {}
