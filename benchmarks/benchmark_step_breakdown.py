"""Where an engine step's time goes: scheduler, input preparation, device, output, at batch B.

    python benchmarks/benchmark_step_breakdown.py --model DIR --batch-size 64

Loads the model with `LLM` (every bucket compiled), runs a short unmeasured warm-up, then
adds `--batch-size` random-id prompts at once and steps the engine to the end with
`step_timers.StepTimers` around its own calls. Prints mean ms per step and % of the step for
the decode steps at full batch (B = batch size, one token each) and for all steps; the
issue's target is scheduler + input preparation < 10% of the step at batch 64.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench_common import allowed_ids, print_table, random_token_ids, write_json
from step_timers import PARTS, StepTimers, summarize

TARGET_PCT = 10.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF checkpoint directory")
    p.add_argument("--batch-size", type=int, default=64, help="requests, all added at once")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: --batch-size")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--disable-detokenize", action="store_true")
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    for name in ("batch_size", "input_len", "output_len", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.max_num_seqs = args.max_num_seqs or args.batch_size
    if args.max_num_seqs < args.batch_size:
        p.error(f"--max-num-seqs ({args.max_num_seqs}) must be >= --batch-size "
                f"({args.batch_size}) for steps at full batch")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jaxserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, seed=args.seed, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes, progress=False,
              background_compilation=False)  # every bucket before timing
    engine = llm.llm_engine
    rng = np.random.default_rng(args.seed)
    allowed = allowed_ids(engine.tokenizer)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.output_len,
                            detokenize=not args.disable_detokenize)
    warm = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4)
    llm.generate([{"prompt_token_ids": random_token_ids(rng, allowed, args.input_len)}
                  for _ in range(2)], warm, use_tqdm=False)

    timers = StepTimers(engine)
    compilations_before = engine.compilations.count
    for i in range(args.batch_size):
        engine.add_request(f"b{i}", random_token_ids(rng, allowed, args.input_len), params)
    while engine.has_unfinished_requests():
        timers.timed_step()
    records = timers.records
    decode = [r for r in records
              if r.get("num_reqs") == args.batch_size and r.get("num_tokens") == args.batch_size]
    cases = {f"decode B={args.batch_size}": summarize(decode), "all steps": summarize(records)}

    rows = []
    for name, s in cases.items():
        if s["num_steps"]:
            rows += [[name, part, s["parts_ms"][part], f"{s['parts_pct'][part]:.1f}%"]
                     for part in PARTS]
            rows.append([name, "step (mean)", s["step_ms"], f"{s['num_steps']} steps"])
    print_table(["steps", "part", "mean ms/step", "% of step"], rows)
    head = cases[f"decode B={args.batch_size}"]
    if head["num_steps"]:
        pct = head["host_overhead_pct"]
        print(f"scheduler + input prep at decode B={args.batch_size}: {pct:.1f}% of the step "
              f"(target < {TARGET_PCT:g}%: {'met' if pct < TARGET_PCT else 'not met'})")
    else:
        print(f"no decode step ran at B={args.batch_size} (raise --output-len)")
    results = {"cases": cases, "compilations_while_measured":
               engine.compilations.count - compilations_before, "args": vars(args),
               "steps": records}
    write_json(args.output_json, results)
    return results


if __name__ == "__main__":
    main()
