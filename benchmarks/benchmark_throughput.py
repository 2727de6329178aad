"""Offline throughput: one request list through jaxserve, HF `generate`, HF continuous
batching or the real vLLM CPU engine.

Workloads: `random` (vLLM's `--dataset-name random`: lengths uniform around a mean) and
`sharegpt-like` (lengths from a synthetic histogram shipped in data/); prompt ids are the
tokenizer's non-special ids, from the seed. Every backend gets the same list, greedy, EOS
ignored, and must produce exactly each request's output length. Only generation is timed,
after loading (reported apart where the backend has a start-up) and a short warm-up.
`hf-cb` and `vllm` are optional: if missing, the script says what to install (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from throughput_hf import BackendUnavailable, run_hf, run_hf_cb
from throughput_vllm import run_vllm
from throughput_workloads import (BenchRequest, sample_random_requests,
                                  sample_sharegpt_like_requests)

BACKENDS = ("jaxserve", "hf", "hf-cb", "vllm")


def run_jaxserve(requests: list[BenchRequest], warm_up: list[BenchRequest],
                 args) -> tuple[float, dict]:
    """Seconds for one `LLM.generate` over all requests, and the engine's metrics."""
    from jaxserve import LLM, SamplingParams
    from pallas_kernels.cpu import build

    if args.cpu_march:
        os.environ[build.MARCH_ENV] = build.resolve_march(args.cpu_march)
    start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, seed=args.seed, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len,
              enable_prefix_caching=args.enable_prefix_caching,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes,
              compilation_cache_dir=args.compilation_cache_dir,
              attention_backend=args.attention_backend, load_format=args.load_format,
              quantization=args.quantization, progress=False)
    startup = time.perf_counter() - start  # loading, and compiling the smallest buckets
    llm.wait_for_compilation()  # the rest compile in the background: not while timed
    compiled = time.perf_counter() - start

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
    metrics["startup_s"] = startup
    metrics["all_compiled_s"] = compiled
    metrics["cpu"] = build.describe()
    return elapsed, metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="jaxserve")
    parser.add_argument("--model", required=True, help="local HF checkpoint directory")
    parser.add_argument("--dataset-name", choices=("random", "sharegpt-like"), default="random")
    parser.add_argument("--input-len", type=int, default=128, help="random")
    parser.add_argument("--output-len", type=int, default=128, help="random")
    parser.add_argument("--random-range-ratio", type=float, default=0.0, help="random")
    parser.add_argument("--sharegpt-output-len", type=int, default=None,
                        help="sharegpt-like: every output this long (vLLM's flag)")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        default="float32")
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                        help="jaxserve, hf: dummy = random weights from config.json alone")
    parser.add_argument("--disable-detokenize", action="store_true",
                        help="skip turning output ids into text (all backends)")
    parser.add_argument("--output-json", help="write the results to this JSON file")
    parser.add_argument("--hf-max-batch-size", type=int, default=16,
                        help="hf: requests per static batch")
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1,
                        help="hf, hf-cb: torch intra-op threads (default: all cores)")
    parser.add_argument("--max-num-seqs", type=int, default=64,
                        help="jaxserve, hf-cb, vllm: B budget")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="jaxserve, hf-cb, vllm: T budget per step")
    parser.add_argument("--max-model-len", type=int, default=None, help="jaxserve, vllm")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                        help="jaxserve: KV pool size (default: the engine's choice)")
    parser.add_argument("--quantization", default=None,
                        help="jaxserve: weight quantization, e.g. int8 or int4 (LLM's keyword)")
    parser.add_argument("--cpu-march", default=None,
                        help="jaxserve: build target of the native CPU kernels, e.g. "
                             "x86-64-v3 (sets JAXSERVE_CPU_MARCH; default: its value, else "
                             "native)")
    parser.add_argument("--attention-backend", choices=("cpu", "pallas", "reference"),
                        default=None, help="jaxserve: attention kernel (default: by platform)")
    parser.add_argument("--compilation-cache-dir", default=None,
                        help="jaxserve: JAX's persistent compilation cache (faster restarts)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True, help="jaxserve, hf-cb (block sharing), vllm")
    parser.add_argument("--hf-cb-block-size", type=int, default=256,
                        help="hf-cb: tokens per page (transformers' page_size)")
    parser.add_argument("--hf-cb-num-blocks", type=int, default=None,
                        help="hf-cb: pages in the cache (default: max-num-seqs of the longest "
                             "request; never transformers' own sizing, which can take 15 GB)")
    parser.add_argument("--vllm-venv", default=None,
                        help="vllm: its venv (default $VLLM_VENV or benchmarks/peers/.venv-vllm)")
    parser.add_argument("--vllm-dtype", choices=("float32", "bfloat16"), default=None,
                        help="vllm: model dtype (default: --dtype)")
    parser.add_argument("--vllm-kvcache-space-gb", type=int, default=4,
                        help="vllm: VLLM_CPU_KVCACHE_SPACE unless already set")
    parser.add_argument("--vllm-omp-threads-bind", default=None,
                        help="vllm: VLLM_CPU_OMP_THREADS_BIND, e.g. 0-1 for both of 2 cores "
                             "(default: vLLM's 'auto', which reserves one core on small hosts)")
    args = parser.parse_args(argv)
    for name in ("input_len", "output_len", "num_prompts", "hf_max_batch_size", "num_threads",
                 "max_num_seqs", "max_num_batched_tokens", "hf_cb_block_size",
                 "vllm_kvcache_space_gb"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("sharegpt_output_len", "hf_cb_num_blocks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def make_requests(tokenizer, args) -> tuple[list[BenchRequest], list[BenchRequest]]:
    """The measured list and the warm-up list (other prompts: no prefix-cache gain)."""
    if args.dataset_name == "sharegpt-like":
        from transformers import AutoConfig

        max_len = (args.max_model_len  # pairs that do not fit are drawn again
                   or getattr(AutoConfig.from_pretrained(args.model),
                              "max_position_embeddings", None))
        requests = sample_sharegpt_like_requests(
            tokenizer, num_prompts=args.num_prompts, seed=args.seed,
            output_len=args.sharegpt_output_len, max_model_len=max_len)
        warm_len = min(len(r.prompt_token_ids) for r in requests)
    else:
        requests = sample_random_requests(
            tokenizer, num_prompts=args.num_prompts, input_len=args.input_len,
            output_len=args.output_len, range_ratio=args.random_range_ratio, seed=args.seed)
        warm_len = args.input_len
    warm_up = sample_random_requests(tokenizer, num_prompts=2, input_len=warm_len,
                                     output_len=4, range_ratio=0.0, seed=args.seed + 1)
    return requests, warm_up


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    requests, warm_up = make_requests(tokenizer, args)
    run = {"jaxserve": run_jaxserve, "hf": run_hf, "hf-cb": run_hf_cb,
           "vllm": run_vllm}[args.backend]
    try:
        elapsed, extra = run(requests, warm_up, args)
    except BackendUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

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
        "startup_s": extra.get("startup_s"),
        "args": vars(args),
        "backend_stats": extra,
    }
    label = {"hf": f"hf (batch {args.hf_max_batch_size})",
             "vllm": f"vllm ({args.vllm_dtype or args.dtype}"
                     + (f", bind {args.vllm_omp_threads_bind})" if args.vllm_omp_threads_bind
                        else ")")}.get(args.backend, args.backend)
    startup = "n/a" if results["startup_s"] is None else f"{results['startup_s']:.1f}"
    print(f"{'backend':<18} {'requests/s':>11} {'output tok/s':>13} {'total tok/s':>12} "
          f"{'elapsed s':>10} {'start-up s':>11}")
    print(f"{label:<18} {results['requests_per_second']:>11.2f} "
          f"{results['output_tokens_per_second']:>13.1f} {results['tokens_per_second']:>12.1f} "
          f"{elapsed:>10.2f} {startup:>11}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
