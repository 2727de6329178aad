"""Decode step time against the memory roofline, with a profile of where it goes.

    python benchmarks/e2e_decode.py --model DIR --batch-sizes 64 256 --context 1024 \
        --out-md decode.md [--bandwidth-json bw.json]

One engine (`--load-format dummy`, every bucket compiled first) per run. Per batch size B:
B random prompts of `--context` tokens are prefilled, then `--steps` decode steps at full
batch are timed (`step_timers`: median wall time per `engine.step()`, async scheduling on,
and the host's share), then `--profile-steps` more run under `jax.profiler.trace`, summarised
by `e2e_profile`. Roofline: the bytes a decode step must read, every weight matrix (the
V x D LM head once, not the embedding table it gathers B rows of) plus B x mean context x
the KV bytes per token, over the copy bandwidth (`bench_bandwidth.json` from
`e2e_bandwidth.py`, or measured here). Appends its tables to `--out-md`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from bench_common import print_table, write_json
from e2e_profile import CATEGORIES, summarize_trace
from step_timers import StepTimers, summarize


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a directory with config.json (dummy weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--warm-steps", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="B budget (default: the largest batch size); the other runs' value "
                        "shares their compiled programs")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--compilation-cache-dir", default=None)
    p.add_argument("--bandwidth-json", default=None,
                   help="e2e_bandwidth.py's output; measured here when absent")
    p.add_argument("--bandwidth-bytes", type=int, default=2 << 30)
    p.add_argument("--out-md", default=None, help="append the tables here")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    args.max_num_seqs = args.max_num_seqs or max(args.batch_sizes)
    if args.max_num_seqs < max(args.batch_sizes):
        p.error(f"--max-num-seqs ({args.max_num_seqs}) must be >= every batch size")
    return args


def bytes_per_step(runner, model_config, batch: int, context: float) -> tuple[float, float]:
    """(weight bytes, KV bytes) one decode step at `batch` x `context` must read."""
    import jax

    weights = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(runner.params)[0]:
        name = jax.tree_util.keystr(path)
        if "embed_tokens" not in name and "lm_head" not in name:
            weights += leaf.nbytes
    itemsize = np.dtype(model_config.dtype).itemsize
    weights += model_config.vocab_size * model_config.hidden_size * itemsize  # the LM head
    pools = jax.tree.leaves(runner.kv_caches)
    tokens = runner.kv_spec.num_blocks * runner.kv_spec.block_size
    kv_per_token = sum(pool.nbytes for pool in pools) / tokens
    return float(weights), batch * context * kv_per_token


def run_batch(llm, timers: StepTimers, batch: int, args, rng, trace_dir: str) -> dict:
    """Prefill `batch` prompts, time full-batch decode steps, then profile a few."""
    from jaxserve import SamplingParams

    engine = llm.llm_engine
    total = args.warm_steps + args.steps + args.profile_steps + 2
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=total,
                            detokenize=False)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, rng.integers(3, 300, args.context).tolist(), params)
    first = len(timers.records)
    decode = lambda r: r.get("num_reqs") == batch and r.get("num_tokens") == batch  # noqa: E731
    while not any(decode(r) for r in timers.records[first:]):  # prefill, first decode step
        if not engine.has_unfinished_requests():
            raise RuntimeError(f"no decode step ran all {batch} requests at once (KV cache "
                               "too small for them?)")
        timers.timed_step()
    for _ in range(args.warm_steps):
        timers.timed_step()
    start, compilations = len(timers.records), engine.compilations.count
    for _ in range(args.steps):
        timers.timed_step()
    timed = [r for r in timers.records[start:] if decode(r)]
    decoded_before = sum(1 for r in timers.records[first:start] if decode(r))
    with tempfile.TemporaryDirectory(dir=trace_dir) as trace:
        import jax

        try:  # a profiler that fails (no CUPTI, say) costs the split, not the timings
            with jax.profiler.trace(trace):
                for _ in range(args.profile_steps):
                    timers.timed_step()
            profile = summarize_trace(trace, args.profile_steps)
        except Exception as error:  # noqa: BLE001 - reported in the table instead
            profile = {"error": f"{type(error).__name__}: {error}"}
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    steps = np.array([r["step"] for r in timed])
    return {"batch": batch, "num_timed_steps": len(timed),
            "step_ms_p50": 1e3 * float(np.median(steps)) if len(steps) else float("nan"),
            "step_ms_mean": 1e3 * float(steps.mean()) if len(steps) else float("nan"),
            "mean_context": args.context + decoded_before + len(timed) / 2,
            "compilations_while_timed": engine.compilations.count - compilations,
            "host_parts": summarize(timed), "profile": profile}


def bandwidth(args) -> float:
    if args.bandwidth_json and os.path.isfile(args.bandwidth_json):
        with open(args.bandwidth_json) as f:
            return float(json.load(f)["bytes_per_s"])
    from e2e_bandwidth import measure

    return measure(args.bandwidth_bytes)["bytes_per_s"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import time

    from jaxserve import LLM

    rng = np.random.default_rng(0)
    bytes_per_s = bandwidth(args)
    start = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype=args.dtype, skip_tokenizer_init=True,
              max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes,
              compilation_cache_dir=args.compilation_cache_dir, progress=False,
              background_compilation=False)
    startup_s = time.perf_counter() - start
    runner, model_config = llm.llm_engine.runner, llm.llm_engine.model_config
    name = os.path.basename(os.path.normpath(args.model))
    with tempfile.TemporaryDirectory() as trace_dir:
        timers = StepTimers(llm.llm_engine)
        cases = [run_batch(llm, timers, b, args, rng, trace_dir) for b in args.batch_sizes]
    rows, profile_rows = [], []
    for case in cases:
        weights, kv = bytes_per_step(runner, model_config, case["batch"], case["mean_context"])
        roofline_ms = 1e3 * (weights + kv) / bytes_per_s
        case.update(weight_bytes=weights, kv_bytes=kv, roofline_ms=roofline_ms,
                    pct_of_roofline=100.0 * roofline_ms / case["step_ms_p50"])
        rows.append([name, case["batch"], round(case["mean_context"]), case["step_ms_p50"],
                     weights / 1e9, kv / 1e9, roofline_ms, f"{case['pct_of_roofline']:.3g}%",
                     f"{case['host_parts'].get('host_overhead_pct', float('nan')):.1f}%",
                     case["compilations_while_timed"]])
        profile = case["profile"]
        if "error" in profile:
            profile_rows.append([name, case["batch"], f"no profile: {profile['error'][:100]}",
                                 float("nan"), ""])
            continue
        profile_rows += [[name, case["batch"], c, profile["per_step_ms"][c],
                          f"{profile['pct'][c]:.1f}%"] for c in CATEGORIES]
        profile_rows += [[name, case["batch"], f"top: {k['kernel'][:60]} ({k['category']})",
                          k["ms_per_step"], ""] for k in profile["top"][:6]]
    tables = [
        f"### Decode, {name} ({model_config.dtype}, dummy weights), copy bandwidth "
        f"{bytes_per_s / 1e9:.0f} GB/s, start-up {startup_s:.1f} s\n",
        print_table(["model", "B", "mean ctx", "step ms (p50)", "weights GB", "KV GB",
                     "roofline ms", "% of roofline", "host sched+prep", "compilations"],
                    rows, markdown=True),
        f"\n### Decode profile, {name}: ms per step by category (jax.profiler trace)\n",
        print_table(["model", "B", "category", "ms/step", "% of step"], profile_rows,
                    markdown=True), ""]
    if args.out_md:
        with open(args.out_md, "a") as f:
            f.write("\n".join(tables) + "\n")
    results = {"model": name, "bandwidth_bytes_per_s": bytes_per_s, "startup_s": startup_s,
               "cases": cases, "args": vars(args)}
    write_json(args.output_json, results)
    return results


if __name__ == "__main__":
    main()
