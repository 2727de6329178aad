"""The native CPU GEMM (pallas_kernels/cpu/matmul) vs XLA's jnp.dot at decode-sized shapes.

For M in {1, 16, 64, 128, 512} and a small model's Linear shapes (hidden 512) plus the tied LM
head (W [32000, 512], layout "nk"), in float32 and bfloat16: GFLOP/s of each and the
speedup, as a markdown table. Each timing is a jitted dot called back to back in a loop
(~50 ms, then block_until_ready); the median over repeats (XLA's and the native loops
alternating) after a warm-up. Both use both cores (XLA's intra-op pool).
Usage: PYTHONPATH=. python benchmarks/kernels/bench_cpu_matmul.py [--out F.md]
"""

import argparse
import statistics
import time

import numpy as np

import jax
import jax.numpy as jnp

from pallas_kernels.cpu import matmul as native

M_VALUES = (1, 16, 64, 128, 512)
SHAPES = (  # (K, N, layout, what)
    (512, 512, "kn", "q/o proj"),
    (512, 128, "kn", "k/v proj"),
    (512, 640, "kn", "fused qkv"),
    (512, 1536, "kn", "gate/up"),
    (512, 3072, "kn", "fused gate-up"),
    (1536, 512, "kn", "down"),
    (512, 32000, "nk", "LM head"),
)


def seconds_per_call(dots, x, w, repeats: int, min_seconds: float = 0.05) -> list[float]:
    """Median seconds per call of each jit(dot)(x, w), called back to back in timed loops.

    The dots' loops alternate within each repeat, so a load that comes and goes (another
    job on the machine) hits them alike.
    """
    fns, loops = [jax.jit(dot) for dot in dots], []
    for fn in fns:
        jax.block_until_ready(fn(x, w))  # compile, warm up
        start = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(fn(x, w))
        loops.append(max(3, int(3 * min_seconds / max(time.perf_counter() - start, 1e-6))))
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, times in zip(fns, loops, samples):
            start = time.perf_counter()
            for _ in range(n):
                y = fn(x, w)
            jax.block_until_ready(y)
            times.append((time.perf_counter() - start) / n)
    return [statistics.median(times) for times in samples]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="*", default=M_VALUES)
    parser.add_argument("--dtype", nargs="*", default=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("the native matmul kernel does not build here")

    rng = np.random.default_rng(0)
    lines = [f"CPU: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
             f"jitted calls back to back, median of {args.repeats} timed loops", "",
             "| M | K | N | layout | what | dtype | XLA GFLOP/s | native GFLOP/s | speedup |",
             "|---:|---:|---:|:---|:---|:---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for dtype_name in args.dtype:
        dtype = jnp.dtype(dtype_name)
        for k, n, layout, what in SHAPES:
            w = jnp.asarray(rng.standard_normal((k, n) if layout == "kn" else (n, k)) * 0.05,
                            dtype)  # [K, N] or [N, K]
            xla_dot = ((lambda x, w: jnp.dot(x, w)) if layout == "kn"
                       else (lambda x, w: jnp.dot(x, w.T)))
            native_dot = lambda x, w, layout=layout: native.matmul(x, w, w_layout=layout)
            for m in args.m:
                x = jnp.asarray(rng.standard_normal((m, k)), dtype)  # [M, K]
                flops = 2.0 * m * k * n
                t_xla, t_nat = seconds_per_call((xla_dot, native_dot), x, w, args.repeats)
                line = (f"| {m} | {k} | {n} | {layout} | {what} | {dtype_name} | "
                        f"{flops / t_xla / 1e9:.0f} | {flops / t_nat / 1e9:.0f} | "
                        f"{t_xla / t_nat:.2f}x |")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
