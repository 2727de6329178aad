"""Offline throughput: one request list, run through jaxserve or Hugging Face `generate`.

Requests are random token ids (the tokenizer's non-special ids) with lengths drawn from the
seed, as vLLM's `--dataset-name random`; both backends get the same list and must produce
exactly each request's output length. Only generation is timed, after loading and a short
warm-up. Prints one table; `--output-json` writes vLLM's fields plus output tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

# vLLM's run_hf keeps max(prompt) + max(output) of a static batch within this many tokens.
HF_MAX_BATCH_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...]  # the prompt; random ids, never special tokens
    output_len: int  # tokens to generate, EOS ignored


def sample_random_requests(tokenizer, *, num_prompts: int, input_len: int, output_len: int,
                           range_ratio: float, seed: int) -> list[BenchRequest]:
    """Lengths uniform in [len * (1 - r), len * (1 + r)]; ids uniform over non-special ids."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)

    def lengths(mean: int) -> np.ndarray:
        low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(low, high + 1, size=num_prompts)

    input_lens, output_lens = lengths(input_len), lengths(output_len)
    return [BenchRequest(tuple(int(t) for t in rng.choice(allowed, size=int(n))), int(m))
            for n, m in zip(input_lens, output_lens)]


def hf_batches(requests: list[BenchRequest], max_batch_size: int) -> list[list[int]]:
    """vLLM's run_hf rule: grow a batch of consecutive requests while it stays under
    `max_batch_size` and max(prompt) + max(output) <= HF_MAX_BATCH_TOKENS."""
    batches, batch, max_prompt, max_output = [], [], 0, 0
    for i, request in enumerate(requests):
        batch.append(i)
        max_prompt = max(max_prompt, len(request.prompt_token_ids))
        max_output = max(max_output, request.output_len)
        if len(batch) < max_batch_size and i != len(requests) - 1:
            following = requests[i + 1]
            if (max(max_prompt, len(following.prompt_token_ids))
                    + max(max_output, following.output_len)) <= HF_MAX_BATCH_TOKENS:
                continue
        batches.append(batch)
        batch, max_prompt, max_output = [], 0, 0
    return batches


def run_jaxserve(requests: list[BenchRequest], warm_up: list[BenchRequest],
                 args) -> tuple[float, dict]:
    """Seconds for one `LLM.generate` over all requests, and the engine's metrics."""
    from jaxserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, seed=args.seed, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len,
              enable_prefix_caching=args.enable_prefix_caching,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes,
              compilation_cache_dir=args.compilation_cache_dir)

    def generate(batch: list[BenchRequest], max_tokens: int | None = None) -> float:
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in batch]
        params = [SamplingParams(temperature=0.0, ignore_eos=True,
                                 max_tokens=max_tokens or r.output_len,
                                 detokenize=not args.disable_detokenize) for r in batch]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        got = [len(o.outputs[0].token_ids) for o in outputs]
        want = [max_tokens or r.output_len for r in batch]
        if got != want:
            raise RuntimeError(f"jaxserve generated {got[:8]}... tokens, expected {want[:8]}...")
        return elapsed

    generate(warm_up, max_tokens=4)  # first-call costs stay out of the timing
    compilations_before = llm.get_metrics()["num_compilations"]
    cpu_start = time.process_time()
    elapsed = generate(requests)
    metrics = llm.get_metrics()
    metrics["cpu_time"] = time.process_time() - cpu_start  # all threads; shows contention
    metrics["num_compilations_while_timed"] = metrics["num_compilations"] - compilations_before
    return elapsed, metrics


def run_hf(requests: list[BenchRequest], warm_up: list[BenchRequest],
           args) -> tuple[float, dict]:
    """Seconds for vLLM's static batching over `model.generate`, greedy, left padding.

    Each batch generates max(output_len) tokens for every member (min_new_tokens pins the
    count past EOS); throughput counts only the tokens each request asked for, as vLLM does.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def generate(batch: list[BenchRequest], max_tokens: int | None = None) -> None:
        width = max(len(r.prompt_token_ids) for r in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):  # left padding
            input_ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            attention_mask[row, width - len(r.prompt_token_ids):] = 1
        new_tokens = max_tokens or max(r.output_len for r in batch)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=pad, use_cache=True)
        if out.shape[1] != width + new_tokens:
            raise RuntimeError(f"HF generated {out.shape[1] - width} tokens, not {new_tokens}")
        if not args.disable_detokenize:
            tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    generate(warm_up, max_tokens=4)
    batches = hf_batches(requests, args.hf_max_batch_size)
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in batches:
        generate([requests[i] for i in batch])
    return time.perf_counter() - start, {"num_batches": len(batches),
                                         "cpu_time": time.process_time() - cpu_start}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("jaxserve", "hf"), default="jaxserve")
    parser.add_argument("--model", required=True, help="local HF checkpoint directory")
    parser.add_argument("--dataset-name", choices=("random",), default="random")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        default="float32")
    parser.add_argument("--disable-detokenize", action="store_true",
                        help="skip turning output ids into text (both backends)")
    parser.add_argument("--output-json", help="write the results to this JSON file")
    parser.add_argument("--hf-max-batch-size", type=int, default=16,
                        help="hf: requests per static batch")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1,
                        help="hf: torch intra-op threads (default: all cores)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="jaxserve: B budget")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="jaxserve: T budget per step")
    parser.add_argument("--max-model-len", type=int, default=None, help="jaxserve")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="jaxserve: KV pool size (default: the engine's choice)")
    parser.add_argument("--compilation-cache-dir", default=None,
                        help="jaxserve: JAX's persistent compilation cache (faster restarts)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True, help="jaxserve")
    args = parser.parse_args(argv)
    for name in ("input_len", "output_len", "num_prompts", "hf_max_batch_size", "num_threads",
                 "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    requests = sample_random_requests(
        tokenizer, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.random_range_ratio, seed=args.seed)
    # Other prompts than the measured ones, so the prefix cache gains nothing from warm-up.
    warm_up = sample_random_requests(tokenizer, num_prompts=2, input_len=args.input_len,
                                     output_len=4, range_ratio=0.0, seed=args.seed + 1)
    run = run_jaxserve if args.backend == "jaxserve" else run_hf
    elapsed, extra = run(requests, warm_up, args)

    num_output = sum(r.output_len for r in requests)
    num_total = num_output + sum(len(r.prompt_token_ids) for r in requests)
    results = {
        "backend": args.backend,
        "elapsed_time": elapsed,
        "num_requests": len(requests),
        "total_num_tokens": num_total,
        "total_output_tokens": num_output,
        "requests_per_second": len(requests) / elapsed,
        "tokens_per_second": num_total / elapsed,
        "output_tokens_per_second": num_output / elapsed,
        "args": vars(args),
        "backend_stats": extra,
    }
    label = args.backend + (f" (batch {args.hf_max_batch_size})" if args.backend == "hf" else "")
    print(f"{'backend':<18} {'requests/s':>11} {'output tok/s':>13} {'total tok/s':>12} "
          f"{'elapsed s':>10}")
    print(f"{label:<18} {results['requests_per_second']:>11.2f} "
          f"{results['output_tokens_per_second']:>13.1f} {results['tokens_per_second']:>12.1f} "
          f"{elapsed:>10.2f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
