"""Writes a random-weight Qwen2 checkpoint (weights, config, tokenizer) into a directory.

    python benchmarks/make_random_checkpoint.py --preset qwen2-40m /tmp/qwen2-40m

A thin command line over `jaxserve.testing.checkpoints.save_random_checkpoint`; prints the
directory and the exact parameter count. The throughput benchmark reads the directory.
"""

from __future__ import annotations

import argparse
import math
import os

from jaxserve.testing.checkpoints import PRESETS, save_random_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write (created if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2-40m")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from safetensors import safe_open

    path = save_random_checkpoint(args.out, preset=args.preset, seed=args.seed)
    with safe_open(os.path.join(path, "model.safetensors"), framework="np") as tensors:
        num_params = sum(math.prod(tensors.get_slice(name).get_shape())
                         for name in tensors.keys())
    print(f"wrote {args.preset} (seed {args.seed}) to {path}: {num_params:,} parameters")


if __name__ == "__main__":
    main()
