"""The throughput benchmark's Hugging Face backends: `hf` and `hf-cb`.

`hf` is vLLM's `run_hf`: static batches over `model.generate`, left padded, each batch
generating its longest output for every member. `hf-cb` is transformers' own continuous
batching (a paged cache, `continuous_batching_context_manager`), each request with its own
`max_new_tokens` and EOS off. Both are greedy; each returns (seconds generating, stats).
"""

from __future__ import annotations

import math
import time

from throughput_workloads import BenchRequest

# vLLM's run_hf keeps max(prompt) + max(output) of a static batch within this many tokens.
HF_MAX_BATCH_TOKENS = 2048


class BackendUnavailable(RuntimeError):
    """An optional backend cannot run here; the message says what to install."""


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


def _load(args):
    """The tokenizer and the model, on the GPU when torch sees one; with `--load-format
    dummy` random weights initialised there from the config (SDPA attention)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "load_format", "auto") == "dummy":
        config = AutoConfig.from_pretrained(args.model)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    return tokenizer, model.eval()


def run_hf(requests: list[BenchRequest], warm_up: list[BenchRequest],
           args) -> tuple[float, dict]:
    """Seconds for vLLM's static batching over `model.generate`, greedy, left padding.

    Each batch generates max(output_len) tokens for every member (min_new_tokens pins the
    count past EOS); throughput counts only the tokens each request asked for, as vLLM does.
    """
    import torch

    tokenizer, model = _load(args)
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
            input_ids = input_ids.to(model.device)
            attention_mask = attention_mask.to(model.device)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=pad,
                                 use_cache=True).cpu()  # waits for a GPU to finish
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


def hf_cb_num_blocks(requests: list[BenchRequest], *, max_num_seqs: int, page_size: int) -> int:
    """Enough pages for `max_num_seqs` of the longest request at once (+1 spare). Set
    explicitly: transformers' default sizing can take ~15 GB of RAM on a CPU."""
    longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    return math.ceil(longest / page_size) * max_num_seqs + 1


def run_hf_cb(requests: list[BenchRequest], warm_up: list[BenchRequest],
              args) -> tuple[float, dict]:
    """Seconds for transformers' continuous batching over all requests, greedy, EOS off.

    The manager (cache allocation, its generation thread) starts before the clock and is
    reported as `startup_s`; the warm-up requests go through the same manager first.
    """
    try:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError as error:
        raise BackendUnavailable(
            "--backend hf-cb needs a transformers with continuous batching "
            f"(ContinuousBatchingConfig, 5.x): {error}") from error
    tokenizer, model = _load(args)
    if not hasattr(model, "continuous_batching_context_manager"):
        raise BackendUnavailable("--backend hf-cb: this transformers has no "
                                 "continuous_batching_context_manager")
    page_size = args.hf_cb_block_size
    num_blocks = args.hf_cb_num_blocks or hf_cb_num_blocks(
        requests + warm_up, max_num_seqs=args.max_num_seqs, page_size=page_size)
    cb_config = ContinuousBatchingConfig(
        page_size=page_size, num_blocks=num_blocks,
        max_batch_tokens=args.max_num_batched_tokens, max_requests_per_batch=args.max_num_seqs,
        allow_block_sharing=args.enable_prefix_caching, seed=args.seed)
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=1,
                                  pad_token_id=tokenizer.pad_token_id or 0)

    def generate(manager, batch: list[BenchRequest], tag: str,
                 max_tokens: int | None = None) -> None:
        want = {}
        for i, r in enumerate(batch):
            request_id = manager.add_request(list(r.prompt_token_ids), request_id=f"{tag}{i}",
                                             max_new_tokens=max_tokens or r.output_len,
                                             eos_token_id=-1)
            if request_id is None:
                raise RuntimeError(f"hf-cb refused request {i}")
            want[request_id] = max_tokens or r.output_len
        done = {}
        while len(done) < len(want):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("hf-cb's generation thread stopped")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"hf-cb request {result.request_id}: {result.error}")
                done[result.request_id] = result.generated_tokens
        got = [len(done[k]) for k in want]
        if got != list(want.values()):
            raise RuntimeError(f"hf-cb generated {got[:8]}... tokens, expected "
                               f"{list(want.values())[:8]}...")
        if not args.disable_detokenize:
            tokenizer.batch_decode([done[k] for k in want], skip_special_tokens=True)

    start = time.perf_counter()
    with model.continuous_batching_context_manager(  # its thread runs without autograd
            generation_config=gen_config, continuous_batching_config=cb_config,
            block=True, timeout=30) as manager:
        startup = time.perf_counter() - start
        attention = model.config._attn_implementation  # what CB switched to
        generate(manager, warm_up, "w", max_tokens=4)
        start, cpu_start = time.perf_counter(), time.process_time()
        generate(manager, requests, "r")
        elapsed = time.perf_counter() - start
        cpu_time = time.process_time() - cpu_start
    return elapsed, {"startup_s": startup, "cpu_time": cpu_time, "num_blocks": num_blocks,
                     "page_size": page_size,
                     "attn_implementation": attention}
