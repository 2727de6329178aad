"""The executable cache: a second start loads every step program without tracing it.

In this process: a tiny jitted function through `ExecutableCache` (miss, hit, damaged
entry, all-or-nothing reading, keys); and two engines of the session's checkpoint with one
cache directory. Across processes (slow): a restart compiles nothing.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.runner.executable_cache import ExecutableCache
from jaxserve.testing import forbid_compilation
from jaxserve.testing.hf_reference import random_prompts


def _lowering(n, scale):
    """A program of its own per `scale`: entries are written only for what XLA compiles,
    not for what JAX's persistent cache (the session's) already holds."""
    fn = jax.jit(lambda x: jnp.cumsum(x * scale))
    return lambda: fn.lower(jax.ShapeDtypeStruct((n,), np.float32))


def test_a_miss_compiles_and_stores_then_a_hit_loads_the_same_program(tmp_path):
    first = ExecutableCache(tmp_path, "desc")
    compiled = first.get_or_compile("cumsum 8", _lowering(8, 2.0))
    assert (first.hits, first.misses) == (0, 1) and first.path("cumsum 8").exists()
    second = ExecutableCache(tmp_path, "desc")
    second.use_for(["cumsum 8"])
    loaded = second.get_or_compile("cumsum 8", lambda: pytest.fail("traced on a hit"))
    assert (second.hits, second.misses) == (1, 0)
    x = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(loaded(x), compiled(x))


def test_entries_are_keyed_by_description_program_and_environment(tmp_path, monkeypatch):
    cache = ExecutableCache(tmp_path, "desc")
    paths = {cache.path("forward 16 8"), cache.path("forward 32 8"),
             ExecutableCache(tmp_path, "other desc").path("forward 16 8")}
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_dump_to=/x")
    paths.add(ExecutableCache(tmp_path, "desc").path("forward 16 8"))
    assert len(paths) == 4
    assert ExecutableCache(tmp_path, "desc").context != cache.context


def test_reading_is_all_or_nothing(tmp_path):
    cache = ExecutableCache(tmp_path, "desc")
    cache.get_or_compile("cumsum 8", _lowering(8, 4.0))
    partial = ExecutableCache(tmp_path, "desc")
    partial.use_for(["cumsum 8", "cumsum 16"])  # one entry missing: trace everything
    assert not partial.reading
    partial.get_or_compile("cumsum 8", _lowering(8, 4.0))
    partial.get_or_compile("cumsum 16", _lowering(16, 4.0))
    assert (partial.hits, partial.misses) == (0, 2) and partial.path("cumsum 16").exists()
    complete = ExecutableCache(tmp_path, "desc")
    complete.use_for(["cumsum 8", "cumsum 16"])
    assert complete.reading


_LOAD_IN_A_NEW_PROCESS = """
import pickle, sys
import jax, numpy as np
from jaxserve.runner.executable_cache import ExecutableCache
cache = ExecutableCache(sys.argv[1], "new sources")
cache.use_for(["cumsum 8"])
compiled = cache.get_or_compile("cumsum 8", lambda: sys.exit("traced on a hit"))
print(np.asarray(compiled(np.ones(8, np.float32))).tolist())
"""


def test_a_program_jax_cache_supplied_is_compiled_again_and_stored(tmp_path):
    # new sources (another description) over a JAX cache that holds the program: the
    # executable JAX read back is not written, a fresh compilation of it is
    ExecutableCache(tmp_path, "old sources").get_or_compile("cumsum 8", _lowering(8, 6.5))
    upgraded = ExecutableCache(tmp_path, "new sources")
    compiled = upgraded.get_or_compile("cumsum 8", _lowering(8, 6.5))
    assert upgraded.num_unstored == 1 and not upgraded.path("cumsum 8").exists()
    assert upgraded.store_unstored(stop=lambda: True) == 0  # asked to stop: nothing done
    assert upgraded.store_unstored() == 1 and upgraded.num_unstored == 0
    assert upgraded.path("cumsum 8").exists() and jax.config.jax_enable_compilation_cache
    # the entry runs in a fresh process (a re-serialized executable would fail there:
    # "Function ... not found")
    out = subprocess.run([sys.executable, "-c", _LOAD_IN_A_NEW_PROCESS, str(tmp_path)],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    expected = np.asarray(compiled(np.ones(8, np.float32))).tolist()
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_a_damaged_entry_is_dropped_and_the_program_compiled_again(tmp_path, caplog):
    cache = ExecutableCache(tmp_path, "desc")
    cache.get_or_compile("cumsum 8", _lowering(8, 5.5))
    cache.path("cumsum 8").write_bytes(b"not a pickle")
    again = ExecutableCache(tmp_path, "desc")
    again.use_for(["cumsum 8"])
    with caplog.at_level(logging.WARNING):
        compiled = again.get_or_compile("cumsum 8", _lowering(8, 5.5))
    assert "does not load" in caplog.text and again.misses == 1
    np.testing.assert_allclose(compiled(np.ones(8, np.float32)), 5.5 * np.arange(1, 9))
    # JAX's cache had it: an executable read from there is not written (module doc)
    assert not again.path("cumsum 8").exists()


@pytest.mark.slow  # XLA compiles every program (6 s); the restarts below cover it too
def test_a_second_engine_loads_every_program_and_samples_the_same(engine_checkpoint,
                                                                 tmp_path):
    from jaxserve import LLM

    # Budgets no other test uses (max_model_len sets the block tables' width): XLA compiles
    # every program here, which is when entries are written (not from JAX's cache).
    kwargs = dict(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=208,
                  progress=False, background_compilation=False,
                  compilation_cache_dir=str(tmp_path))
    first = LLM(str(engine_checkpoint("qwen2")), **kwargs)
    programs = first.llm_engine.runner.compiled
    assert programs.cache.misses == programs.num_programs and programs.cache.hits == 0
    second = LLM(str(engine_checkpoint("qwen2")), **kwargs)
    loaded = second.llm_engine.runner.compiled
    assert (loaded.cache.hits, loaded.cache.misses) == (loaded.num_programs, 0)
    assert second.get_metrics()["num_compilations"] == 0  # nothing compiled, nothing traced
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 40, 17], seed=3)]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=10, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=6, presence_penalty=1.0,
                             prompt_logprobs=1)]
    expected = first.generate(prompts, params, use_tqdm=False)
    with forbid_compilation():
        outputs = second.generate(prompts, params, use_tqdm=False)
    for got, want in zip(outputs, expected):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].logprobs == want.outputs[0].logprobs


_SCRIPT = textwrap.dedent("""
    import json, sys
    from jaxserve import LLM, SamplingParams
    llm = LLM(sys.argv[1], compilation_cache_dir=sys.argv[2], max_num_seqs=8,
              max_num_batched_tokens=32, progress=False, tensor_parallel_size=int(sys.argv[3]),
              quantization=sys.argv[4] if len(sys.argv) > 4 else None)
    llm.wait_for_compilation()  # the larger buckets compile in the background
    out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                       SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    cache = llm.llm_engine.runner.compiled.cache
    print(json.dumps({"compilations": llm.get_metrics()["num_compilations"],
                      "programs": llm.get_metrics()["num_programs_compiled"],
                      "hits": cache.hits, "tokens": out[0].outputs[0].token_ids}))
""")


def _start(model_dir, cache_dir, tp=1, quantization=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(model_dir), str(cache_dir),
                          str(tp), *[quantization] * bool(quantization)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("tp, quantization", [(1, None), (2, None), (1, "int8")])
def test_a_restart_compiles_nothing(tiny_checkpoint, tmp_path, tp, quantization):
    # int8: the native quantized GEMM's handlers are registered without a trace
    model_dir = tiny_checkpoint("llama", with_tokenizer=True)
    first = _start(model_dir, tmp_path / "cache", tp, quantization)
    assert first["hits"] == 0 and first["compilations"] >= first["programs"] > 0
    second = _start(model_dir, tmp_path / "cache", tp, quantization)
    assert second["programs"] == first["programs"] and second["hits"] == second["programs"]
    assert second["compilations"] == 0 and second["tokens"] == first["tokens"]
