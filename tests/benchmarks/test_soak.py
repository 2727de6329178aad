"""benchmarks/soak.py, short: concurrent mixed clients against a real server, some cutting
their streams short and some sending invalid requests; afterwards no request runs, no KV
block is held, no answer was a 5xx or malformed, and the server's RSS stayed flat."""

import sys

import pytest


def _soak_and_launch(import_benchmarks, engine_checkpoint, cache, monkeypatch,
                     *serve_flags: str):
    """soak.py's module, and the command serving the tiny qwen2 checkpoint as "tiny" with
    the test budgets and `serve_flags`."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch = " ".join((sys.executable, "-m jaxserve.entrypoints.cli serve",
                       str(engine_checkpoint("qwen2")), "--port 0 --served-model-name tiny",
                       f"--compilation-cache-dir {cache} --max-num-seqs 16",
                       "--max-num-batched-tokens 128 --no-background-compilation",
                       *serve_flags))
    return import_benchmarks("soak").soak, launch


@pytest.mark.slow
def test_a_short_soak_leaks_nothing_and_every_answer_is_well_formed(
        import_benchmarks, engine_checkpoint, shared_compilation_cache, monkeypatch, capsys):
    soak, launch = _soak_and_launch(import_benchmarks, engine_checkpoint,
                                    shared_compilation_cache, monkeypatch)
    summary = soak.main(["--launch", launch, "--model", "tiny", "--clients", "16",
                         "--duration", "45", "--warmup", "15", "--max-tokens", "24"])
    outcomes = summary["outcomes"]
    assert summary["errors"] == {}, summary["error_examples"]
    assert outcomes["ok"] > 100 and outcomes["disconnected"] > 0 and outcomes["rejected"] > 0
    assert summary["final_running"] == 0 and summary["final_waiting"] == 0
    assert summary["final_kv_cache_usage"] == 0
    assert summary["rss_growth"] <= 0.05, summary
    assert "TTFT p50 ms" in capsys.readouterr().out


@pytest.mark.slow
def test_an_overload_soak_sheds_with_503s_preempts_and_leaks_nothing(
        import_benchmarks, engine_checkpoint, shared_compilation_cache, monkeypatch):
    """--overload: long prompts on a 32-block pool (the budgets of
    tests/entrypoints/openai/test_server_overload.py) with at most 16 waiting."""
    soak, launch = _soak_and_launch(
        import_benchmarks, engine_checkpoint, shared_compilation_cache, monkeypatch,
        "--max-model-len 256 --num-gpu-blocks-override 33 --max-num-waiting 16")
    summary = soak.main(["--launch", launch, "--model", "tiny", "--clients", "48",
                         "--duration", "30", "--warmup", "10", "--max-tokens", "24",
                         "--prompt-words", "30", "45", "--overload"])
    outcomes = summary["outcomes"]
    assert summary["errors"] == {}, summary["error_examples"]
    assert outcomes["ok"] > 20 and outcomes["shed"] > 0 and outcomes["disconnected"] > 0
    assert summary["preemptions"] > 0
    assert summary["final_running"] == 0 and summary["final_waiting"] == 0
    assert summary["final_kv_cache_usage"] == 0
