"""Serving while compiling: an engine answers from the buckets compiled so far while the
others compile in the background; its steps stay inside them, never compile, and give the
tokens of an engine that compiled everything first."""

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.engine.engine_args import create_engine_config
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.runner.sampling_rows import EARLY_VARIANTS
from jaxserve.testing import forbid_compilation
from jaxserve.testing.hf_reference import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True,
                         logprobs=2)


@pytest.fixture(scope="module")
def prompts():
    return [{"prompt_token_ids": p} for p in random_prompts([3, 20, 41, 60, 7, 33, 90, 12,
                                                             5, 17], seed=4)]


@pytest.fixture(scope="module")
def expected(qwen2_llm, prompts):
    """The tokens of the shared engine, which compiled every program first."""
    assert qwen2_llm.llm_engine.runner.compiled.done
    return [o.outputs[0].token_ids for o in qwen2_llm.generate(prompts, GREEDY, use_tqdm=False)]


def _engine(path, engine_kwargs) -> LLMEngine:
    kwargs = {k: v for k, v in engine_kwargs.items() if k != "progress"}
    return LLMEngine(create_engine_config(str(path), **kwargs), warm_up=False,
                     progress=False)


def _run(engine: LLMEngine, prompts, params=GREEDY) -> tuple[list, list[tuple[int, int]]]:
    """Token ids of each prompt, and each step's (tokens, sequences)."""
    schedule, steps = engine.scheduler.schedule, []

    def recording(**kwargs):
        out = schedule(**kwargs)
        steps.append((out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)))
        return out

    engine.scheduler.schedule = recording
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p["prompt_token_ids"], params)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    return [done[str(i)].outputs[0].token_ids for i in range(len(prompts))], steps


def test_steps_stay_inside_the_buckets_compiled_so_far(engine_checkpoint, engine_kwargs,
                                                       prompts, expected, qwen2_llm):
    engine = _engine(engine_checkpoint("qwen2"), engine_kwargs)
    compiled = engine.runner.compiled
    assert engine.runner.capacity is None
    with pytest.raises(RuntimeError, match="compile_programs"):
        engine.step()
    assert compiled.compile_next_stage() and engine.runner.capacity == (16, 8)
    assert compiled.num_compiled < compiled.num_programs
    assert compiled.sample_variants(8) == EARLY_VARIANTS  # the rest run as `penalties`
    with forbid_compilation():
        tokens, steps = _run(engine, prompts)
        sampled, _ = _run(engine, prompts[:4], SAMPLED)
    assert tokens == expected  # chunked into 16-token steps: the same greedy tokens
    assert sampled == [o.outputs[0].token_ids for o in qwen2_llm.generate(
        prompts[:4], SAMPLED, use_tqdm=False)]  # its own `sample` program: the same draws
    assert max(t for t, _ in steps) == 16 and max(b for _, b in steps) <= 8
    assert engine.get_stats()["num_compilations_after_warm_up"] == 0
    compiled.compile_all()
    assert compiled.done and engine.runner.capacity == (128, 16)
    assert compiled.num_compiled == compiled.num_programs == engine.get_stats()[
        "num_programs_compiled"]
    with pytest.raises(RuntimeError, match="not compiled"):
        compiled.forward(256, 8)


def test_requests_run_while_the_rest_compiles_in_the_background(engine_checkpoint,
                                                                engine_kwargs, prompts,
                                                                expected):
    llm = LLM(str(engine_checkpoint("qwen2")),
              **{**engine_kwargs, "background_compilation": True})
    engine = llm.llm_engine
    assert engine.runner.capacity is not None  # the first stage is there at once
    with forbid_compilation():  # the background thread may compile; steps may not
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.wait_for_compilation(timeout=600)
    stats = llm.get_metrics()
    assert stats["num_programs_pending"] == 0 and stats["num_compilations_after_warm_up"] == 0
    assert engine.runner.compiled.error is None
    assert engine.runner.capacity == (128, 16)


@pytest.mark.slow  # a fresh interpreter that compiles: 10 s of the default run
def test_a_process_that_exits_while_compiling_joins_the_compile_thread(engine_checkpoint,
                                                                       tmp_path):
    """A daemon compile thread still inside XLA when the interpreter finalizes can abort the
    process (seen as SIGABRT): at exit the stage in progress finishes and the thread ends
    before finalization. The script's own exit hook, registered first, runs last."""
    import subprocess
    import sys

    script = ("import atexit, sys\n"
              "from jaxserve import LLM, SamplingParams\n"
              "held = {}\n"
              "atexit.register(lambda: print('alive at exit:',\n"
              "                held['llm'].llm_engine.runner.compiled._thread.is_alive()))\n"
              "llm = held['llm'] = LLM(sys.argv[1], max_num_seqs=64, max_model_len=256,\n"
              "    max_num_batched_tokens=1024, progress=False, compilation_cache_dir=sys.argv[2])\n"
              "out = llm.generate([{'prompt_token_ids': [5, 6, 7]}], SamplingParams(max_tokens=2),\n"
              "                   use_tqdm=False)\n"
              "assert not llm.llm_engine.runner.compiled.done, 'finished compiling: no test'\n"
              "print(len(out[0].outputs[0].token_ids))\n")
    done = subprocess.run([sys.executable, "-c", script, str(engine_checkpoint("qwen2")),
                           str(tmp_path / "cache")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-2:] == ["2", "alive at exit: False"]
