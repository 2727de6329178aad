"""Prefix caching: N users sharing a long system prompt, with the cache on and off.

Each user sends the shared prefix (`--prefix-len` random ids) plus a distinct question;
a second workload uses a prefix of `--prefix-len + --odd-offset` tokens (not a multiple of
the block size) and a third has no shared prefix at all (the 0% hit-rate overhead). Runs
offline through `LLM`'s engine step loop; prints TTFT p50/p90, throughput and hit rate.
At 0% hits it also times the engine's prefix-caching code itself (`CachingHostTime`): the
compiled programs are identical with the cache on or off, so that share of the run is the
overhead, resolved far below this machine's run-to-run noise.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench_common import (allowed_ids, drive_engine, percentiles, print_table,
                          random_token_ids, save_plot, write_json)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--num-users", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=2000)
    p.add_argument("--odd-offset", type=int, default=7,
                   help="the second workload's prefix is this much longer (0: skip it)")
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--zero-hit-input-len", type=int, default=256,
                   help="prompt length of the no-shared-prefix workload (0: skip it)")
    p.add_argument("--zero-hit-output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each case")
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=512 * 2**20)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None, help="PNG of the TTFT CDFs, cache on vs off")
    return p.parse_args(argv)


def make_workloads(args, tokenizer) -> dict[str, tuple[list, list]]:
    """name -> (warm-up prompts, measured prompts); the warm-up carries the shared prefix
    with another question, so a cache-on run starts with the system prompt cached."""
    rng = np.random.default_rng(args.seed)
    allowed = allowed_ids(tokenizer)
    workloads = {}
    lengths = [("shared", args.prefix_len)]
    if args.odd_offset:
        lengths.append(("shared+odd", args.prefix_len + args.odd_offset))
    for name, length in lengths:
        prefix = random_token_ids(rng, allowed, length)
        users = [prefix + random_token_ids(rng, allowed, args.question_len)
                 for _ in range(args.num_users + 1)]
        workloads[f"{name} {length}"] = (users[:1], users[1:])
    if args.zero_hit_input_len:
        prompts = [random_token_ids(rng, allowed, args.zero_hit_input_len)
                   for _ in range(args.num_users + 1)]
        workloads["no shared prefix"] = (prompts[:1], prompts[1:])
    return workloads


# The engine's prefix-caching work: hashing full blocks, looking up hits, registering
# filled blocks, evicting cached hashes on reuse. (object path from the engine, method)
CACHING_CALLS = (("scheduler", "_update_block_hashes"),
                 ("scheduler.kv_cache_manager", "get_computed_blocks"),
                 ("scheduler.kv_cache_manager", "_cache_full_blocks"),
                 ("scheduler.kv_cache_manager.block_pool", "_evict"))


class CachingHostTime:
    """Seconds an engine spends in its prefix-caching code, by wrapping those calls on its
    own objects (nothing in jaxserve changes). The compiled programs are the same with the
    cache on or off, so at a 0% hit rate this host time is the whole cost of caching."""

    def __init__(self, engine):
        self.seconds = 0.0
        for path, method in CACHING_CALLS:
            target = engine
            for name in path.split("."):
                target = getattr(target, name)
            setattr(target, method, self._timed(getattr(target, method)))

    def _timed(self, original):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def run_case(llm, warm_up, prompts, output_len, args, host_time: CachingHostTime) -> dict:
    from jaxserve import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=output_len,
                            detokenize=False)
    drive_engine(engine, [(p, params) for p in warm_up])
    before = llm.get_metrics()
    host_before = host_time.seconds
    run = drive_engine(engine, [(p, params) for p in prompts],
                       max_concurrency=args.max_concurrency)
    after = llm.get_metrics()
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    return {"ttft_ms": [t * 1e3 for t in run["ttft_s"]], "elapsed_s": run["elapsed_s"],
            "output_tokens": run["output_tokens"], "hit_rate": hits / queries if queries else
            None, # The counter hears every engine of the process: count the measured run only.
            "compilations_while_measured": after["num_compilations"]
            - before["num_compilations"], "caching_host_s": host_time.seconds - host_before}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jaxserve import LLM

    llms = {caching: LLM(args.model, dtype=args.dtype, seed=args.seed,
                         enable_prefix_caching=caching, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         max_model_len=args.max_model_len, block_size=args.block_size,
                         kv_cache_memory_bytes=args.kv_cache_memory_bytes, progress=False,
                         background_compilation=False)  # every bucket before timing
            for caching in (True, False)}
    host_times = {caching: CachingHostTime(llm.llm_engine) for caching, llm in llms.items()}
    workloads = make_workloads(args, llms[True].get_tokenizer())
    runs: dict[tuple[str, bool], list[dict]] = {}
    for name, (warm_up, prompts) in workloads.items():
        output_len = args.zero_hit_output_len if name == "no shared prefix" else args.output_len
        for repeat in range(args.repeats):
            for caching in ((True, False) if repeat % 2 == 0 else (False, True)):
                llms[caching].llm_engine.scheduler.kv_cache_manager.reset_prefix_cache()
                result = run_case(llms[caching], warm_up, prompts, output_len, args,
                                  host_times[caching])
                runs.setdefault((name, caching), []).append(result)
    rows, cases = [], []
    for (name, caching), results in runs.items():
        ttft = percentiles([t for r in results for t in r["ttft_ms"]])
        tput = [r["output_tokens"] / r["elapsed_s"] for r in results]
        req_s = [len(workloads[name][1]) / r["elapsed_s"] for r in results]
        hit = results[0]["hit_rate"]
        case = {"workload": name, "prefix_caching": caching, "ttft_ms": ttft,
                "output_tok_s": float(np.median(tput)), "requests_s": float(np.median(req_s)),
                "output_tok_s_runs": tput, "hit_rate": hit,
                "caching_host_share": float(np.median([r["caching_host_s"] / r["elapsed_s"]
                                                       for r in results])),
                "compilations_while_measured": sum(r["compilations_while_measured"]
                                                   for r in results),
                "ttft_ms_all": [t for r in results for t in r["ttft_ms"]]}
        cases.append(case)
        rows.append([name, "on" if caching else "off", "n/a" if hit is None else f"{hit:.1%}",
                     ttft["p50"], ttft["p90"], case["requests_s"], case["output_tok_s"]])
    print_table(["workload", "caching", "hit rate", "TTFT p50 ms", "TTFT p90 ms", "req/s",
                 "out tok/s"], rows)
    by_key = {(c["workload"], c["prefix_caching"]): c for c in cases}
    summary = {}
    for name in workloads:
        on, off = by_key[(name, True)], by_key[(name, False)]
        if name == "no shared prefix":
            summary["zero_hit_throughput_loss"] = 1 - on["output_tok_s"] / off["output_tok_s"]
            summary["zero_hit_caching_host_share"] = (on["caching_host_share"]
                                                      - off["caching_host_share"])
            print(f"{name}: throughput with caching on vs off: "
                  f"{-summary['zero_hit_throughput_loss']:+.1%} (run-to-run noise included); "
                  f"time in prefix-caching code: {summary['zero_hit_caching_host_share']:.2%} "
                  "of the run (the compiled programs are the same on and off)")
        else:
            speedup = off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"]
            summary[f"ttft_p50_speedup {name}"] = speedup
            print(f"{name}: TTFT p50 {speedup:.1f}x lower with caching on, "
                  f"p90 {off['ttft_ms']['p90'] / on['ttft_ms']['p90']:.1f}x")
    summary["compilations_while_measured"] = sum(c["compilations_while_measured"] for c in cases)
    print(f"XLA compilations while measured: {summary['compilations_while_measured']}")
    results = {"cases": cases, "summary": summary, "args": vars(args)}
    write_json(args.output_json, results)

    def draw(ax):
        for case in cases:
            if case["workload"] == "no shared prefix":
                continue
            values = np.sort(case["ttft_ms_all"])
            mode = "on" if case["prefix_caching"] else "off"
            ax.plot(values, np.arange(1, len(values) + 1) / len(values),
                    label=f"{case['workload']}, caching {mode}")
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{args.num_users} users sharing a {args.prefix_len}-token prefix")
        ax.legend()

    save_plot(args.plot, draw)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
