"""The throughput benchmark runs end to end on a tiny random checkpoint (jaxserve and hf).

The benchmark runs as a subprocess, exactly as documented (slow); the checkpoint maker's
`main`, the request samplers, the flags and vLLM's static-batching rule are checked directly
as plain functions. `hf-cb` and `vllm` never run here; only the message for a missing vLLM
venv is checked.
"""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str, check: bool = True,
         timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def bench(import_benchmarks):
    """The throughput benchmark's request and batching functions, from its sibling modules."""
    modules = import_benchmarks("throughput_workloads", "throughput_hf")
    return types.SimpleNamespace(**vars(modules.throughput_workloads),
                                 hf_batches=modules.throughput_hf.hf_batches)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, import_benchmarks):
    """The checkpoint maker's `main`, in this process (the benchmark runs below are scripts)."""
    path = tmp_path_factory.mktemp("tiny-random") / "model"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        import_benchmarks("make_random_checkpoint").make_random_checkpoint.main(
            ["--preset", "tiny", str(path)])
    assert "parameters" in printed.getvalue()
    return path


@pytest.mark.slow
def test_comparison_runs_each_backend_skips_a_missing_vllm_and_plots(tiny_model_dir, tmp_path):
    out, plot = tmp_path / "compare.json", tmp_path / "compare.png"
    done = _run("compare_throughput.py", "--model", str(tiny_model_dir), "--repeats", "1",
                "--backends", "jaxserve", "hf", "vllm", "--hf-batch-sizes", "4",
                "--jaxserve-dtypes", "bfloat16",
                "--vllm-dtypes", "float32", "--vllm-venv", str(tmp_path / "no-such-venv"),
                "--dataset-name", "random", "--num-prompts", "6", "--input-len", "12",
                "--output-len", "6", "--random-range-ratio", "0.5", "--seed", "1",
                "--num-threads", "1", "--max-num-seqs", "8", "--max-num-batched-tokens", "32",
                "--output-json", str(out), "--plot", str(plot))
    assert done.stdout.splitlines()[0].split()[:2] == ["backend", "requests/s"]
    result = json.loads(out.read_text())
    assert set(result["medians_output_tok_s"]) == {"jaxserve bfloat16", "hf batch 4"}
    for label, (run,) in ((k, v) for k, v in result["runs"].items() if v):
        assert run["num_requests"] == 6, label
        for field in ("requests_per_second", "tokens_per_second", "output_tokens_per_second",
                      "elapsed_time"):
            assert run[field] > 0, (label, field)
    assert "setup_vllm_cpu.sh" in result["notes"]["vllm float32"]
    assert result["ratios"]["hf batch"]["ratio"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_sharegpt_like_requests_follow_the_seed_and_the_shipped_histogram(bench, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    kwargs = dict(num_prompts=400, seed=5, max_model_len=1024)
    requests = bench.sample_sharegpt_like_requests(tokenizer, **kwargs)
    assert requests == bench.sample_sharegpt_like_requests(tokenizer, **kwargs)
    hist = bench.load_length_histogram()
    low, high = hist["input_len"]["bin_edges"][0], hist["input_len"]["bin_edges"][-1]
    assert all(low <= len(r.prompt_token_ids) < high and r.output_len >= 4
               and len(r.prompt_token_ids) + r.output_len <= 1024 for r in requests)
    mean_in = sum(len(r.prompt_token_ids) for r in requests) / len(requests)
    assert 0.6 * hist["input_len"]["mean"] < mean_in < 1.4 * hist["input_len"]["mean"]
    fixed = bench.sample_sharegpt_like_requests(tokenizer, num_prompts=5, seed=5, output_len=7)
    assert [r.output_len for r in fixed] == [7] * 5


def _sharegpt_run_flags(model, out) -> list[str]:
    return ["--backend", "jaxserve", "--model", model, "--dataset-name", "sharegpt-like",
            "--num-prompts", "3", "--sharegpt-output-len", "3", "--max-num-seqs", "4",
            "--max-num-batched-tokens", "64", "--output-json", out]


def test_throughput_benchmark_accepts_the_flags_of_its_run(import_benchmarks):
    script = import_benchmarks("benchmark_throughput").benchmark_throughput
    args = script.parse_args(_sharegpt_run_flags("m", "o.json"))
    assert (args.backend, args.dataset_name, args.output_json) == ("jaxserve", "sharegpt-like",
                                                                   "o.json")


@pytest.mark.slow
def test_throughput_benchmark_runs_the_sharegpt_like_workload(tiny_model_dir, tmp_path):
    out = tmp_path / "result.json"
    _run("benchmark_throughput.py", *_sharegpt_run_flags(str(tiny_model_dir), str(out)))
    result = json.loads(out.read_text())
    assert result["num_requests"] == 3 and result["total_output_tokens"] == 9
    assert result["total_num_tokens"] > 9 + 3 * 3 and result["output_tokens_per_second"] > 0


def test_vllm_backend_without_its_venv_exits_2_saying_how_to_make_it(import_benchmarks,
                                                                    tiny_model_dir, tmp_path,
                                                                    capsys):
    script = import_benchmarks("benchmark_throughput").benchmark_throughput
    with pytest.raises(SystemExit) as exited:
        script.main(["--backend", "vllm", "--model", str(tiny_model_dir), "--num-prompts", "2",
                     "--input-len", "4", "--output-len", "2",
                     "--vllm-venv", str(tmp_path / "no-such-venv")])
    assert exited.value.code == 2 and "setup_vllm_cpu.sh" in capsys.readouterr().err


@pytest.mark.slow
def test_vllm_backend_without_its_venv_says_how_to_make_it(tiny_model_dir, tmp_path):
    done = _run("benchmark_throughput.py", "--backend", "vllm", "--model", str(tiny_model_dir),
                "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
                "--vllm-venv", str(tmp_path / "no-such-venv"), check=False)
    assert done.returncode == 2
    assert "setup_vllm_cpu.sh" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_quantization_benchmark_reports_each_kind_against_float32(tiny_model_dir, tmp_path):
    out = tmp_path / "quantization.json"
    _run("benchmark_quantization.py", "--model", str(tiny_model_dir), "--num-prompts", "3",
         "--prompt-len", "8", "--max-tokens", "4", "--kinds", "int8", "int4_g32",
         "--kv-dtypes", "int8", "--max-num-seqs", "2", "--output-json", str(out),
         timeout=600)  # four engines
    rows = json.loads(out.read_text())["rows"]
    assert [row[1:3] for row in rows] == [[source, variant]
                                          for variant in ("int8", "int4_g32", "KV int8")
                                          for source in ("natural", "random")]
    for row in rows:
        free_running, prefix, teacher_forced = (float(v.rstrip("%")) for v in row[3:6])
        assert 0 <= prefix <= free_running <= 100 and 0 <= teacher_forced <= 100
        assert 0 < row[6] < 1  # the logits differ, by less than their scale
    result = json.loads(out.read_text())
    for row, flips in zip(rows, result["flip_rows"]):
        assert flips[:3] == row[:3]
        flipped, positions = map(int, flips[3].split(" / "))
        assert positions == 3 * 4  # prompts x max tokens
        assert flipped == round(positions * (1 - float(row[5].rstrip("%")) / 100))
    ((_, kv, float32_ratio, bfloat16_ratio),) = result["kv_block_ratios"]
    assert kv == "int8" and float32_ratio > bfloat16_ratio > 1


@pytest.mark.slow
def test_dashboard_cost_benchmark_times_a_full_ring_and_the_whole_pool(tiny_model_dir,
                                                                        tmp_path):
    out = tmp_path / "result.json"
    _run("benchmark_dashboard_cost.py", "--model", str(tiny_model_dir), "--max-num-seqs", "4",
         "--repeats", "2", "--output-json", str(out))
    result = json.loads(out.read_text())
    assert result["step_records"] > 0 and result["num_blocks"] > 0
    assert result["summary_ms"] > 0 and result["event_bytes"] > 0
    assert result["history_bytes"] > result["event_bytes"]  # every second since the oldest


@pytest.mark.slow
@pytest.mark.parametrize("fill", ["serial", "parallel"])
def test_structured_outputs_benchmark_reports_the_mask_work_on_the_step_path(
        tiny_model_dir, tmp_path, fill):
    out = tmp_path / "result.json"
    _run("benchmark_structured_outputs.py", "--model", str(tiny_model_dir), "--num-prompts",
         "4", "--max-tokens", "96", "--max-num-seqs", "4", "--repeats", "1", "--fill", fill,
         "--output-json", str(out))
    result = json.loads(out.read_text())
    assert result["json_schema"]["valid_json"] == 4 and result["parallel_fill"] == (
        fill == "parallel")
    assert result["widest_batch"] == 4 and result["num_fills"] > 0
    # the forward runs while every mask fills: the step waits for what remains of it
    assert result["num_fills_overlapped"] == result["num_fills"]
    assert 0 < result["fill_wall_ms_widest_p50"] and result["advance_ms_p50"] > 0
    if fill == "serial":  # on the engine thread: its CPU is the fill's
        assert 0 < result["fill_cpu_ms_widest_p50"] <= result["fill_wall_ms_widest_p50"] * 1.5
