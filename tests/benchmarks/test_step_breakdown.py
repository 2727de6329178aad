"""The step-breakdown benchmark splits each engine step into parts that add up to the step.

The script runs as a subprocess on a tiny random checkpoint with a tiny batch, exactly as
documented (slow; the default run checks its flags); `step_timers.parts_of` is checked
directly as a plain function.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from jaxserve.testing.checkpoints import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("tiny") / "model", "tiny")


def _run_flags(model, out) -> list[str]:
    return ["--model", model, "--batch-size", "4", "--input-len", "8", "--output-len", "5",
            "--max-num-batched-tokens", "32", "--output-json", out]


def test_step_breakdown_accepts_the_flags_of_its_run(import_benchmarks):
    script = import_benchmarks("benchmark_step_breakdown").benchmark_step_breakdown
    args = script.parse_args(_run_flags("m", "o.json"))
    assert (args.model, args.batch_size, args.output_json) == ("m", 4, "o.json")


@pytest.mark.slow
def test_step_breakdown_reports_parts_that_add_up_at_full_batch(tiny_model, tmp_path):
    out = tmp_path / "breakdown.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "benchmark_step_breakdown.py"),
         *_run_flags(tiny_model, str(out))],
        env=env, capture_output=True, text=True, timeout=120, check=True)
    assert "scheduler + input prep at decode B=4" in done.stdout
    result = json.loads(out.read_text())
    decode = result["cases"]["decode B=4"]
    assert decode["num_steps"] >= 3  # 5 output tokens: one from the prefill, then decodes
    assert sum(decode["parts_pct"].values()) == pytest.approx(100.0)
    assert decode["parts_ms"]["device"] > 0 and decode["parts_ms"]["scheduler"] > 0
    assert 0 < decode["host_overhead_pct"] < 100
    assert result["cases"]["all steps"]["num_steps"] == len(result["steps"])
    assert result["compilations_while_measured"] == 0


def test_step_parts_split_dispatch_and_collect_into_host_and_device_time():
    spec = importlib.util.spec_from_file_location("step_timers", BENCHMARKS / "step_timers.py")
    timers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timers)
    record = {"schedule": 1.0, "update_from_output": 0.5, "prepare": 2.0,
              "sampling_gather": 0.25, "device_put": 0.75, "dispatch": 4.0, "collect": 6.0,
              "runner_output": 1.0, "output_processor": 0.5, "step": 13.0}
    parts = timers.parts_of(record)
    assert parts == {"scheduler": 1.5, "input prep": 3.0, "device": 6.0, "output": 1.5,
                     "other": 1.0}
    assert timers.summarize([record])["host_overhead_pct"] == pytest.approx(4.5 / 13 * 100)
