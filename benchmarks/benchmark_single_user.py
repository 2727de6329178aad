"""One user chatting: streamed decode time per token (TPOT) next to the weight-bandwidth bound.

    python benchmarks/benchmark_single_user.py [--model PATH] [--dtype float32]
        [--cpu-march x86-64-v3] [--output-len 200] [--num-prompts 3]

Starts `jaxserve serve` (default: the default model) on a free port with the native CPU
kernels built for `--cpu-march` (JAXSERVE_CPU_MARCH; default: its value, else native),
sends `--num-prompts` chat requests one after another through `benchmark_serving.py`
(streamed, greedy, EOS ignored) and prints TPOT with the bound a decode step cannot beat on
this machine: every weight is read once per token (the tied embedding once, through the
LM head), bytes / the read bandwidth of a large jnp.sum on both cores.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

from bench_common import print_table, write_json
import benchmark_serving


def read_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Bytes per second of jnp.sum over a float32 array of `num_bytes` (best of 5)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((num_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        total(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def num_weights(model: str) -> int:
    """How many weights the model's file holds (the tied embedding once)."""
    if model.endswith(".gguf"):
        import gguf

        return sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(model).tensors)
    from safetensors import safe_open

    files = [os.path.join(model, f) for f in os.listdir(model) if f.endswith(".safetensors")]
    count = 0
    for path in files:
        with safe_open(path, framework="np") as tensors:
            count += sum(int(np.prod(tensors.get_slice(k).get_shape())) for k in tensors.keys())
    return count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: jaxserve's default model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--cpu-march", default=None)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    from jaxserve.entrypoints.default_model import default_model_path
    from pallas_kernels.cpu import build

    model = args.model or default_model_path()
    if args.cpu_march:
        os.environ[build.MARCH_ENV] = build.resolve_march(args.cpu_march)
    bandwidth = read_bandwidth()
    weight_bytes = num_weights(model) * (4 if args.dtype == "float32" else 2)
    bound_ms = weight_bytes / bandwidth * 1e3
    launch = (f"{shlex.quote(sys.executable)} -m jaxserve.entrypoints.cli serve "
              f"{shlex.quote(model)} --port 0 --dtype {args.dtype}")
    served = benchmark_serving.main([
        "--launch", launch, "--model", model,
        "--endpoint", "/v1/chat/completions", "--prompt-kind", "text",
        "--num-prompts", str(args.num_prompts), "--max-concurrency", "1",
        "--input-len", str(args.input_len), "--output-len", str(args.output_len)])
    tpot = served["tpot_ms"]
    results = {"cpu": build.describe(), "model": model, "dtype": args.dtype,
               "weight_bytes": weight_bytes, "read_bandwidth_gbs": bandwidth / 1e9,
               "bound_ms": bound_ms, "tpot_ms": tpot, "completed": served["completed"]}
    print(f"\nCPU: {results['cpu']}")
    print_table(["model", "dtype", "TPOT p50 ms", "TPOT p90 ms", "tokens/s", "weights MB",
                 "read GB/s", "bound ms", "TPOT / bound"],
                [[os.path.basename(model), args.dtype, tpot["p50"], tpot["p90"],
                  1e3 / tpot["p50"], weight_bytes / 1e6, bandwidth / 1e9, bound_ms,
                  tpot["p50"] / bound_ms]])
    write_json(args.output_json, results)
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["completed"] else 1)
