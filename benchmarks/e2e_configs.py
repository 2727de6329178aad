"""The model directories of the end-to-end GPU run: config.json and a tokenizer, no weights.

    python benchmarks/e2e_configs.py OUT_DIR [--tiny]

Writes OUT_DIR/qwen2.5-1.5b and OUT_DIR/llama-3.1-8b: each a transformers config with that
model's shapes (bf16) and the test tokenizer (`jaxserve.testing.tokenizer`, trained here on
its synthetic corpus, no hub) with the model's vocabulary size, so every id a random model
samples detokenizes to text (streamed chunks, and so TTFT, need text); for
`--load-format dummy`. `--tiny`: the same families at a few thousand parameters, for the CPU
dry run. Prints one line per model.
"""

from __future__ import annotations

import argparse
import os

# name -> (transformers config class, its arguments): the published shapes.
MODELS = {
    "qwen2.5-1.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "llama-3.1-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def write_model(out_dir: str, name: str, *, tiny: bool = False) -> str:
    """OUT_DIR/name: config.json (bfloat16), generation_config.json and the tokenizer."""
    import transformers

    from jaxserve.testing.tokenizer import save_tokenizer

    class_name, shape = MODELS[name]
    config = getattr(transformers, class_name)(
        **{**shape, **(TINY if tiny else {})}, bos_token_id=1, eos_token_id=0,
        dtype="bfloat16", architectures=[class_name.replace("Config", "ForCausalLM")])
    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=0).save_pretrained(path)
    save_tokenizer(path, vocab_size=config.vocab_size)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--tiny", action="store_true", help="a few thousand parameters (CPU)")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    paths = []
    for name in args.models:
        paths.append(write_model(args.out_dir, name, tiny=args.tiny))
        print(f"{name}: {paths[-1]}")
    return paths


if __name__ == "__main__":
    main()
