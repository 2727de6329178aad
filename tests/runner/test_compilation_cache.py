"""JAX's persistent compilation cache: a second start reads every program from disk.

In this process (default run): the session's engine (`qwen2_llm`) has written its programs
to the session's cache, and a second engine of the same checkpoint and budgets reads each of
them back. Across processes (slow: two interpreter starts): a restart with the cache
directory of the first start.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import pytest

from jaxserve.runner.executable_cache import SUBDIR

_SCRIPT = textwrap.dedent("""
    import json, sys, jax
    from jaxserve import LLM
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
    llm = LLM(sys.argv[1], compilation_cache_dir=sys.argv[2], max_num_seqs=8,
              skip_tokenizer_init=True, max_num_batched_tokens=32, progress=False)
    llm.wait_for_compilation()  # the larger buckets compile in the background
    print(json.dumps({"compilations": llm.get_metrics()["num_compilations"],
                      "programs": llm.get_metrics()["num_programs_compiled"],
                      "cache_hits": len(hits)}))
""")


def test_a_second_engine_reads_every_program_of_the_first_from_the_cache(
        qwen2_llm, engine_checkpoint, engine_kwargs):
    from jaxserve import LLM

    hits = []

    def on_event(event: str, **kwargs) -> None:
        if event.endswith("/cache_hits"):
            hits.append(event)

    jax.monitoring.register_event_listener(on_event)
    try:  # qwen2_llm: the same checkpoint and engine_kwargs, built before
        second = LLM(str(engine_checkpoint("qwen2")), **engine_kwargs)
    finally:
        jax.monitoring.unregister_event_listener(on_event)
    programs = second.get_metrics()["num_programs_compiled"]
    assert programs == qwen2_llm.get_metrics()["num_programs_compiled"] > 0
    assert len(hits) >= programs  # every step program came from disk


def _start(model_dir, cache_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(model_dir), str(cache_dir)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_restart_hits_the_persistent_cache_for_every_program(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("llama")
    first = _start(model_dir, tmp_path / "cache")
    assert first["cache_hits"] == 0 and any((tmp_path / "cache").iterdir())
    # without the executables (executable_cache.py) the programs are traced again and
    # the lowered programs hit JAX's cache
    shutil.rmtree(tmp_path / "cache" / SUBDIR)
    second = _start(model_dir, tmp_path / "cache")
    assert second["programs"] == first["programs"] > 0
    assert second["cache_hits"] >= second["programs"]  # every step program came from disk
