"""benchmarks/gpu_e2e.sh, the prepared end-to-end GPU run, cannot rot between lent GPUs.

Default run: every command the script would run (its GPU_E2E_PLAN listing, full and tiny)
parses with the flags of the script it calls, and the profile summary reads a real trace.
Slow: the whole script on the CPU with tiny configs (GPU_E2E_TINY=1), every table checked.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from jaxserve.engine.engine_args import EngineArgs
from jaxserve.entrypoints import cli

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_e2e.sh"
MODELS = ("qwen2.5-1.5b", "llama-3.1-8b")


def _script(tmp_path, *steps, **env):
    full_env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
                "GPU_E2E_WORK": str(tmp_path / "work"), "JAX_PLATFORMS": "cpu",
                "OMP_NUM_THREADS": "1", **env}
    full_env.pop("XLA_FLAGS", None)  # one CPU device, as on one GPU
    return subprocess.run(["bash", str(SCRIPT), *steps], env=full_env, capture_output=True,
                          text=True, timeout=1500, check=True)


@pytest.mark.parametrize("tiny", ["", "1"])
def test_every_planned_command_parses_with_its_scripts_flags(tmp_path, import_benchmarks, tiny):
    plan = _script(tmp_path, GPU_E2E_PLAN="1", GPU_E2E_TINY=tiny).stdout
    commands = {m.group(1): m.group(2)  # versions is bash -c $'...', which shlex cannot read
                for m in re.finditer(r"^PLAN ([^:]+): (.*)$", plan, re.MULTILINE)}
    expected = {"versions", "configs", "bandwidth", "report"}
    for model in MODELS:
        expected |= {f"decode {model}", f"server {model}"}
        expected |= {f"{kind} {model} {w}" for kind in ("throughput", "hf")
                     for w in (("32x8", "8x32") if tiny else ("1024x128", "128x1024"))}
        expected |= {f"serving {model} c={c}" for c in (("2", "4") if tiny else ("8", "64"))}
    assert set(commands) == expected
    for name, line in commands.items():
        if name == "versions":
            continue
        argv = shlex.split(line)
        if argv[0] == "env":  # env VAR=value ... python script.py
            argv = [a for a in argv[1:] if "=" not in a]
        if argv[1:3] == ["-m", "jaxserve.entrypoints.cli"]:
            args = cli.build_parser().parse_args(argv[3:])
            engine = EngineArgs.from_cli_args(args.model, args)  # the options' rules hold
            assert engine.load_format == "dummy" and engine.dtype == "bfloat16"
            continue
        module = pathlib.Path(argv[1]).stem
        args = getattr(import_benchmarks(module), module).parse_args(argv[2:])
        if getattr(args, "load_format", None) is not None:
            assert args.load_format == "dummy", name


def test_the_profile_summary_splits_a_real_trace_by_category(tmp_path, import_benchmarks):
    import jax
    import jax.numpy as jnp

    profile = import_benchmarks("e2e_profile").e2e_profile
    step = jax.jit(lambda x, w: jnp.tanh(x @ w) + 1.0)
    x = w = jnp.ones((128, 128))
    step(x, w).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            step(x, w).block_until_ready()
    summary = profile.summarize_trace(str(tmp_path), 3)
    per_step = summary["per_step_ms"]
    assert set(per_step) == set(profile.CATEGORIES)
    assert per_step["GEMMs"] > 0 and all(v >= 0 for v in per_step.values())
    assert sum(per_step.values()) == pytest.approx(summary["step_ms"])
    assert summary["top"] and summary["top"][0]["ms_per_step"] > 0
    # the rules name the GPU's kernels: cuBLAS/nvjet GEMMs, the Pallas attention kernel,
    # XLA's scatter (the KV write), and every op of the runner's sampler program
    assert profile.categorize("jit_forward", "custom-call.3", "nvjet_hsh_128x64") == "GEMMs"
    assert profile.categorize("jit_forward", "custom-call.9",
                              "ragged_paged_attention_gpu") == "attention"
    assert profile.categorize("jit_forward", "scatter.4", "input_scatter_fusion") == "KV write"
    assert profile.categorize("jit_sample", "reduce.2", "loop_reduce_fusion") == "sampler"
    assert profile.categorize("jit_forward", "add.1", "loop_add_fusion") == "other"


def _tables(path: pathlib.Path) -> list[list[list[str]]]:
    """The markdown tables of a file: rows of cells, the separator dropped; each row has
    its header's number of cells."""
    tables, current = [], None
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if current is None:
                current = [cells]
                tables.append(current)
            elif not set("".join(cells)) <= set("-"):
                assert len(cells) == len(current[0]), line
                current.append(cells)
        else:
            current = None
    return tables


def _number(cell: str) -> float:
    return float(cell.rstrip("%"))


@pytest.mark.slow  # about 20 Python processes, 8 of them engines that compile
def test_the_tiny_dry_run_writes_every_table(tmp_path):
    _script(tmp_path, GPU_E2E_TINY="1", GPU_E2E_BUDGET="1400")
    out = tmp_path / "out"
    log = (out / "run.log").read_text()
    exits = re.findall(r"^=== (.+): exit (\d+)$", log, re.MULTILINE)
    assert len(exits) == 1 + 1 + 1 + 2 + 4 + 4 + 4 + 1 and all(c == "0" for _, c in exits), exits
    [bandwidth] = _tables(out / "bandwidth.md")
    assert _number(bandwidth[1][2]) > 0
    decode, profile = _tables(out / "decode.md")[0::2], _tables(out / "decode.md")[1::2]
    assert [row[:2] for t in decode for row in t[1:]] == [[m, b] for m in MODELS
                                                          for b in ("4", "8")]
    for table in decode:
        for row in table[1:]:
            assert _number(row[3]) > 0 and 0 < _number(row[7]) and row[9] == "0", row
    for table in profile:
        assert {row[2] for row in table[1:]} >= {"attention", "GEMMs", "sampler", "KV write",
                                                 "other", "host gaps"}
    [throughput] = _tables(out / "throughput.md")
    assert len(throughput) == 1 + 4
    for row in throughput[1:]:  # every workload ran on both backends, no compilation after
        assert _number(row[3]) > 0 and _number(row[5]) > 0 and _number(row[6]) > 0, row
        assert row[7] == "0" and _number(row[8]) > 0 and _number(row[9]) >= _number(row[8])
        assert row[10] == "4"  # HF: one static batch of 4
    [serving] = _tables(out / "serving.md")
    assert [(row[0], row[1], row[2]) for row in serving[1:]] == [
        (m, c, f"{4 * int(c)}/0") for m in sorted(MODELS) for c in ("2", "4")]
    for row in serving[1:]:
        assert 0 < _number(row[3]) <= _number(row[4]) and 0 < _number(row[5]), row
    results = json.loads((out / "results.json").read_text())
    assert {"bandwidth", "decode_llama-3.1-8b", "serving_llama-3.1-8b_c4"} <= set(results)
