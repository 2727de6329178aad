"""The throughput benchmark runs end to end on a tiny random checkpoint, for both backends.

The checkpoint maker and the benchmark run as subprocesses, exactly as documented; the
request sampler and vLLM's static-batching rule are checked directly as plain functions.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], env=env,
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def bench():
    """benchmarks/benchmark_throughput.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark_throughput",
                                                  BENCHMARKS / "benchmark_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-random") / "model"
    done = _run("make_random_checkpoint.py", "--preset", "tiny", str(path))
    assert "parameters" in done.stdout
    return path


@pytest.mark.parametrize("backend", ["hf", "jaxserve"])
def test_throughput_benchmark_writes_positive_rates(tiny_model_dir, tmp_path, backend):
    out = tmp_path / "result.json"
    done = _run("benchmark_throughput.py", "--backend", backend, "--model", str(tiny_model_dir),
                "--dataset-name", "random", "--num-prompts", "6", "--input-len", "12",
                "--output-len", "6", "--random-range-ratio", "0.5", "--seed", "1",
                "--hf-max-batch-size", "4", "--num-threads", "1", "--max-num-seqs", "8",
                "--max-num-batched-tokens", "32", "--output-json", str(out))
    assert done.stdout.splitlines()[0].split()[:2] == ["backend", "requests/s"]
    result = json.loads(out.read_text())
    assert result["backend"] == backend and result["num_requests"] == 6
    for field in ("requests_per_second", "tokens_per_second", "output_tokens_per_second",
                  "elapsed_time"):
        assert result[field] > 0, field


def test_random_requests_follow_the_seed_and_the_length_range(bench, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    kwargs = dict(num_prompts=50, input_len=20, output_len=10, range_ratio=0.5, seed=3)
    requests = bench.sample_random_requests(tokenizer, **kwargs)
    assert requests == bench.sample_random_requests(tokenizer, **kwargs)
    assert all(10 <= len(r.prompt_token_ids) <= 30 and 5 <= r.output_len <= 15
               for r in requests)
    ids = {t for r in requests for t in r.prompt_token_ids}
    assert ids.isdisjoint(tokenizer.all_special_ids) and max(ids) < len(tokenizer)


def test_hf_batches_close_at_the_batch_size_and_at_2048_tokens(bench):
    def request(prompt_len: int, output_len: int):
        return bench.BenchRequest(tuple(range(prompt_len)), output_len)

    small = [request(10, 10)] * 5
    assert bench.hf_batches(small, max_batch_size=2) == [[0, 1], [2, 3], [4]]
    # The third request would make max(prompt) + max(output) = 1500 + 600 > 2048.
    mixed = [request(1000, 500), request(1500, 100), request(100, 600), request(10, 10)]
    assert bench.hf_batches(mixed, max_batch_size=8) == [[0, 1], [2, 3]]
