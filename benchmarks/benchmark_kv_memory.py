"""KV cache memory: how well paged blocks use a fixed KV budget, versus a contiguous allocator.

Pure Python: jaxserve.core's Scheduler and KVCacheManager run a random workload with a fake
model (one token per sampled request per step, EOS ignored). After every step it counts the
tokens stored (computed tokens of running requests) over the slots their blocks hold, and
the running sequences, for each `--num-blocks` budget; a contiguous allocator would hold
budget // max_model_len sequences. Prints one table (one row per budget).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench_common import print_table, random_lengths, save_plot, write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-blocks", type=int, nargs="+", default=[512, 1024, 2048, 4096],
                   help="KV budgets in blocks (the null block included)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--random-range-ratio", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--arrivals-per-step", type=float, default=4.0,
                   help="mean new requests per step (Poisson); 0 = all at the start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None, help="PNG: max concurrent sequences vs budget")
    args = p.parse_args(argv)
    if args.input_len * (1 + args.random_range_ratio) + args.output_len * (
            1 + args.random_range_ratio) > args.max_model_len:
        p.error("--input-len + --output-len (at the top of the range) exceed --max-model-len")
    return args


def make_requests(args) -> list[tuple[int, list[int], int]]:
    """(arrival step, prompt ids, output length); distinct prompts, so no prefix sharing."""
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    inputs = random_lengths(rng, args.input_len, args.random_range_ratio, n)
    outputs = random_lengths(rng, args.output_len, args.random_range_ratio, n)
    if args.arrivals_per_step > 0:
        steps = np.cumsum(rng.exponential(1.0 / args.arrivals_per_step, size=n)).astype(int)
    else:
        steps = np.zeros(n, dtype=int)
    return [(int(s), [int(t) for t in rng.integers(0, 32000, size=int(i))], int(o))
            for s, i, o in zip(steps, inputs, outputs)]


def simulate(num_blocks: int, requests, args) -> dict:
    from jaxserve.config import CacheConfig, SchedulerConfig
    from jaxserve.core.scheduler import Scheduler
    from jaxserve.core.scheduler_output import ModelRunnerOutput
    from jaxserve.request import Request
    from jaxserve.sampling_params import SamplingParams

    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len),
        CacheConfig(block_size=args.block_size, enable_prefix_caching=False),
        num_blocks=num_blocks)
    kv = scheduler.kv_cache_manager
    utilization, running, occupancy = [], [], []
    step, next_index = 0, 0
    while next_index < len(requests) or scheduler.has_unfinished_requests():
        while next_index < len(requests) and requests[next_index][0] <= step:
            _, prompt, output_len = requests[next_index]
            params = SamplingParams(max_tokens=output_len, ignore_eos=True, detokenize=False)
            scheduler.add_request(Request(f"req-{next_index}", prompt, params))
            next_index += 1
        step += 1
        if not scheduler.has_unfinished_requests():
            continue
        out = scheduler.schedule()
        sampled = {req_id: [7] for req_id in out.sampling_req_ids}
        scheduler.update_from_output(out, ModelRunnerOutput(sampled))
        live = list(scheduler.running.values())
        slots = sum(len(kv.get_block_ids(r.request_id)) for r in live) * args.block_size
        if slots:
            stored = sum(r.num_computed_tokens for r in live)
            utilization.append(stored / slots)
            running.append(len(live))
            occupancy.append(slots / ((num_blocks - 1) * args.block_size))
    contiguous = (num_blocks - 1) * args.block_size // args.max_model_len
    return {"num_blocks": num_blocks, "budget_tokens": (num_blocks - 1) * args.block_size,
            "steps": step, "mean_utilization": float(np.mean(utilization)),
            "min_utilization": float(np.min(utilization)),
            "max_running": int(np.max(running)), "mean_running": float(np.mean(running)),
            "contiguous_max_running": contiguous,
            "ratio_vs_contiguous": (np.max(running) / contiguous) if contiguous else float("inf"),
            "mean_pool_occupancy": float(np.mean(occupancy)),
            "num_preemptions": scheduler.num_preemptions}


def main(argv=None) -> dict:
    args = parse_args(argv)
    requests = make_requests(args)
    cases = [simulate(n, requests, args) for n in args.num_blocks]
    print_table(["KV budget tokens", "mean util", "min util", "pool used", "max seqs",
                 "mean seqs", "contiguous seqs", "paged / contiguous", "preemptions"],
                [[c["budget_tokens"], f"{c['mean_utilization']:.2%}",
                  f"{c['min_utilization']:.2%}", f"{c['mean_pool_occupancy']:.1%}",
                  c["max_running"], c["mean_running"], c["contiguous_max_running"],
                  f"{c['ratio_vs_contiguous']:.1f}x", c["num_preemptions"]] for c in cases])
    results = {"cases": cases, "args": vars(args)}
    write_json(args.output_json, results)

    def draw(ax):
        budgets = [c["budget_tokens"] for c in cases]
        ax.plot(budgets, [c["max_running"] for c in cases], "o-", label="paged, max running")
        ax.plot(budgets, [c["mean_running"] for c in cases], "o--", label="paged, mean running")
        ax.plot(budgets, [c["contiguous_max_running"] for c in cases], "s-",
                label=f"contiguous ({args.max_model_len} tokens each)")
        ax.set_xlabel("KV budget (tokens)")
        ax.set_ylabel("concurrent sequences")
        ax.set_title(f"{args.num_requests} random requests, block size {args.block_size}")
        ax.legend()

    save_plot(args.plot, draw)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
