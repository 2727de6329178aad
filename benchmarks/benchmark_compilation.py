"""Compilation: start-up time, XLA compilations at start-up and after it, bucket padding.

Each engine start runs in its own process (JAX's in-memory cache must start empty): first
with an empty `compilation_cache_dir` (cold), then again with that directory filled (the
persistent cache). Each reports the model load, the time to ready (the smallest buckets
compiled: the engine serves from then on) and to every program compiled (the rest compile
in the background). The cold start also serves `--num-prompts` requests with random lengths
and Poisson arrivals once everything is compiled, counting the steps' compilations (the
target is 0), the padding of each step to its (token, sequence) buckets and which bucket
pairs the steps hit. Prints one table, one row per start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench_common import (allowed_ids, drive_engine, print_table, random_lengths,
                          random_token_ids, save_plot, write_json)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--random-range-ratio", type=float, default=0.9)
    p.add_argument("--request-rate", type=float, default=50.0,
                   help="Poisson arrivals per second; inf = all at once")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compilation-cache-dir", default=None,
                   help="default: a fresh temporary directory")
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None, help="PNG: real vs padded tokens per step")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-workload", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args) -> None:
    """One engine start (and the workload with --run-workload); results to --child."""
    from jaxserve.runner.compilation_counter import CompilationCounter

    counter = CompilationCounter()
    with counter.track():  # the counter counts inside track() only: all of this process
        _run_child(args, counter)


def _run_child(args, counter) -> None:
    from jaxserve.runner.buckets import pad_to_bucket
    from jaxserve.engine.engine_args import create_engine_config
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    config = create_engine_config(
        args.model, dtype=args.dtype, seed=args.seed, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        compilation_cache_dir=args.compilation_cache_dir)
    engine = LLMEngine(config, warm_up=False, progress=False)
    startup = {"count": counter.count, "seconds": time.perf_counter() - t0}
    t1 = time.perf_counter()
    engine.runner.compile_programs(background=True, progress=False)
    ready_s = time.perf_counter() - t0  # the engine serves from here on (smallest buckets)
    first = engine.runner.compiled.num_compiled
    engine.wait_for_compilation()
    warm = {"count": counter.count - startup["count"], "seconds": time.perf_counter() - t1}
    result = {"startup_compilations": startup["count"], "startup_s": startup["seconds"],
              "warm_up_compilations": warm["count"], "warm_up_s": warm["seconds"],
              "ready_s": ready_s, "first_stage_programs": first,
              "num_programs": engine.runner.compiled.num_programs}
    if args.run_workload:
        rng = np.random.default_rng(args.seed)
        allowed = allowed_ids(engine.tokenizer)
        n = args.num_prompts
        ins = random_lengths(rng, args.input_len, args.random_range_ratio, n)
        outs = random_lengths(rng, args.output_len, args.random_range_ratio, n)
        requests = [(random_token_ids(rng, allowed, i),
                     SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=int(o),
                                    detokenize=False)) for i, o in zip(ins, outs)]
        arrivals = (np.zeros(n) if args.request_rate == float("inf")
                    else np.cumsum(rng.exponential(1.0 / args.request_rate, size=n)))
        steps, pairs = [], {}
        schedule = engine.scheduler.schedule

        def recording_schedule(**kwargs):  # ahead=True too (async scheduling)
            out = schedule(**kwargs)
            num_seqs = len(out.num_scheduled_tokens)
            if out.total_num_scheduled_tokens:
                t = pad_to_bucket(out.total_num_scheduled_tokens, engine.runner.token_buckets)
                b = pad_to_bucket(num_seqs, engine.runner.seq_buckets)
                steps.append((out.total_num_scheduled_tokens, t, num_seqs, b))
                pairs[f"{t}x{b}"] = pairs.get(f"{t}x{b}", 0) + 1
            return out

        engine.scheduler.schedule = recording_schedule  # this engine only
        run = drive_engine(engine, requests, arrival_times=arrivals)
        real, padded, seqs, padded_seqs = (np.array(c) for c in zip(*steps))
        result.update({
            "after_warm_up_compilations": engine.step_compilations.count,
            "bucket_pairs_hit": pairs,
            "num_requests": n, "workload_s": run["elapsed_s"],
            "output_tokens": run["output_tokens"], "steps": len(steps),
            "real_tokens": int(real.sum()), "padded_tokens": int(padded.sum()),
            "token_padding_waste": float((padded - real).sum() / real.sum()),
            "seq_padding_waste": float((padded_seqs - seqs).sum() / seqs.sum()),
            "per_step": {"real": real.tolist(), "padded": padded.tolist()}})
    counter.close()
    with open(args.child, "w") as f:
        json.dump(result, f)


def start(args, cache_dir: str, run_workload: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    command = [sys.executable, os.path.abspath(__file__), "--child", path,
               "--compilation-cache-dir", cache_dir]
    for name in ("model", "num_prompts", "input_len", "output_len", "random_range_ratio",
                 "request_rate", "max_num_seqs", "max_num_batched_tokens", "dtype", "seed",
                 "max_model_len"):
        if getattr(args, name) is not None:
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    subprocess.run(command + (["--run-workload"] if run_workload else []), check=True)
    with open(path) as f:
        result = json.load(f)
    os.unlink(path)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    with tempfile.TemporaryDirectory(prefix="jaxserve-cc-") as scratch:
        cache_dir = args.compilation_cache_dir or scratch
        if os.listdir(cache_dir) if os.path.isdir(cache_dir) else False:
            sys.exit(f"--compilation-cache-dir {cache_dir} is not empty: the cold start "
                     "needs an empty one")
        cold = start(args, cache_dir, run_workload=True)
        cached = start(args, cache_dir, run_workload=False)
    rows = []
    for name, r in (("cold (empty cache dir)", cold), ("persistent cache", cached)):
        rows.append([name, r["startup_s"], r["ready_s"], r["first_stage_programs"],
                     r["startup_s"] + r["warm_up_s"], r["num_programs"],
                     r["warm_up_compilations"], r.get("after_warm_up_compilations", "-"),
                     r.get("num_requests", "-"),
                     f"{r['token_padding_waste']:.1%}" if "token_padding_waste" in r else "-",
                     f"{r['seq_padding_waste']:.1%}" if "seq_padding_waste" in r else "-"])
    print_table(["start", "load s", "ready s", "programs at ready", "all compiled s",
                 "programs", "XLA compiles", "compiles while serving", "requests",
                 "token padding", "seq padding"], rows)
    print(f"ready {cold['ready_s']:.1f} s cold -> {cached['ready_s']:.1f} s with the persistent "
          f"cache; all compiled {cold['startup_s'] + cold['warm_up_s']:.1f} s -> "
          f"{cached['startup_s'] + cached['warm_up_s']:.1f} s; "
          f"{cold['after_warm_up_compilations']} compilations while serving "
          f"{cold['num_requests']} requests in {cold['workload_s']:.1f} s")
    print("bucket pairs (T x B) hit, steps: " + ", ".join(
        f"{k} {v}" for k, v in sorted(cold["bucket_pairs_hit"].items(),
                                       key=lambda kv: [int(x) for x in kv[0].split("x")])))
    results = {"cold": cold, "persistent_cache": cached, "args": vars(args)}
    write_json(args.output_json, results)

    def draw(ax):
        real = np.array(cold["per_step"]["real"])
        padded = np.array(cold["per_step"]["padded"])
        order = np.argsort(real)
        ax.plot(real[order], label="real tokens")
        ax.plot(padded[order], label="padded to the token bucket")
        ax.set_xlabel("steps, sorted by real tokens")
        ax.set_ylabel("tokens in the step")
        ax.set_yscale("log", base=2)
        ax.set_title(f"padding waste {cold['token_padding_waste']:.1%} over "
                     f"{cold['steps']} steps")
        ax.legend()

    save_plot(args.plot, draw)
    return results


if __name__ == "__main__":
    main()
