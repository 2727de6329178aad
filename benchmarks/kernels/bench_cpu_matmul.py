"""The native CPU GEMM (pallas_kernels/cpu/matmul) vs XLA's jnp.dot at decode-sized shapes.

For M in {1, 16, 64, 128, 512} and a small model's Linear shapes (hidden 512) plus the tied LM
head (W [32000, 512], layout "nk"), in float32 and bfloat16: GFLOP/s of each and the
speedup, as a markdown table. Each timing is a jitted dot called back to back in a loop
(~50 ms, then block_until_ready); the median over repeats (XLA's and the native loops
alternating) after a warm-up. Both use both cores (XLA's intra-op pool).

--cold: like the engine, where every call gets different weights (a step reads ~80 MB of
them, beyond the 32 MB L3), each timed loop rotates through enough distinct copies of W to
exceed --cold-mb (default 96 MB) so that W comes from DRAM on every call.
--gated: also time the fused gated MLP up-projection `native.gated_mlp` (K=512, F=1536)
against XLA's silu(x @ w_gate) * (x @ w_up) and the LM head's float32 logits
(`out_dtype=jnp.float32`) against XLA's dot with preferred_element_type float32.
--lm-head-argmax: instead, greedy decoding's LM head + argmax (D=512, V=32000, "nk"): the
fused `native.lm_head_argmax` against `native.matmul(..., w_layout="nk", out_dtype=f32)`
followed by XLA's jnp.argmax (and XLA's f32 dot + argmax), and the fused kernel on the
pre-transposed embedding [D, V] (`w_layout="kn"`) against it on E [V, D] ("nk"), at --m
(default 64 256), in milliseconds per call; with --cold the weights come from DRAM on
every call.
--march: the build target of the native kernels (sets JAXSERVE_CPU_MARCH; default: its
value, else native), so that e.g. the AVX2 build (x86-64-v3) can be timed on any machine.
Usage: PYTHONPATH=. python benchmarks/kernels/bench_cpu_matmul.py [--cold] [--gated]
       [--lm-head-argmax] [--m 64 512] [--dtype bfloat16] [--what gate/up down]
       [--march x86-64-v3] [--out F.md]
"""

import argparse
import os
import statistics
import time

import numpy as np

import jax
import jax.numpy as jnp

from pallas_kernels.cpu import build
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


def seconds_per_call(dots, args: list[tuple], repeats: int,
                     min_seconds: float = 0.05) -> list[float]:
    """Median seconds per call of each jit(dot)(*args[i]), called back to back in timed loops.

    `args` holds one argument tuple (hot: the same W every call) or several (cold: call i
    takes args[i % len(args)], distinct copies of the weights). The dots' loops alternate
    within each repeat, so a load that comes and goes (another job on the machine) hits them
    alike.
    """
    fns, loops = [jax.jit(dot) for dot in dots], []
    for fn in fns:
        for a in args:
            jax.block_until_ready(fn(*a))  # compile, warm up, touch every copy
        start = time.perf_counter()
        for i in range(max(3, len(args))):
            jax.block_until_ready(fn(*args[i % len(args)]))
        per_call = (time.perf_counter() - start) / max(3, len(args))
        n = max(3, int(min_seconds / max(per_call, 1e-7)))
        loops.append(max(n, len(args)) if len(args) > 1 else n)
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, times in zip(fns, loops, samples):
            start = time.perf_counter()
            for i in range(n):
                y = fn(*args[i % len(args)])
            jax.block_until_ready(y)
            times.append((time.perf_counter() - start) / n)
    return [statistics.median(times) for times in samples]


def copies(nbytes: int, cold: bool, cold_mb: float) -> int:
    """How many distinct argument sets a timed loop rotates through."""
    return max(2, int(np.ceil(cold_mb * 2**20 / nbytes))) if cold else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="*")
    parser.add_argument("--dtype", nargs="*", default=("float32", "bfloat16"))
    parser.add_argument("--what", nargs="*", help="only these shapes (by `what`)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cold", action="store_true",
                        help="rotate through distinct weights per call (beyond the L3)")
    parser.add_argument("--cold-mb", type=float, default=96.0)
    parser.add_argument("--gated", action="store_true",
                        help="also the fused gated MLP and the LM head's float32 logits")
    parser.add_argument("--no-xla", action="store_true", help="time the native kernel only")
    parser.add_argument("--lm-head-argmax", action="store_true",
                        help="only the fused LM head + argmax vs matmul + jnp.argmax")
    parser.add_argument("--march", default=None,
                        help="build target of the native kernels (default: the environment's)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    if args.march:
        os.environ[build.MARCH_ENV] = build.resolve_march(args.march)
    if not native.available():
        raise SystemExit("the native matmul kernel does not build here")

    rng = np.random.default_rng(0)
    if args.lm_head_argmax:
        return lm_head_argmax_main(args, rng)
    if args.m is None:
        args.m = M_VALUES
    mode = (f"cold: each loop rotates through >= {args.cold_mb:.0f} MB of distinct weights"
            if args.cold else "hot: one weight matrix, reused")
    lines = [f"CPU: {build.describe()}, jax {jax.__version__}, "
             f"jitted calls back to back, median of {args.repeats} timed loops; {mode}", "",
             "| M | K | N | layout | what | dtype | XLA GFLOP/s | native GFLOP/s | speedup |",
             "|---:|---:|---:|:---|:---|:---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)

    def report(m, k, n, layout, what, dtype_name, flops, dots, arg_sets):
        if args.no_xla:
            t_xla, t_nat = float("nan"), seconds_per_call(dots[1:], arg_sets, args.repeats)[0]
        else:
            t_xla, t_nat = seconds_per_call(dots, arg_sets, args.repeats)
        line = (f"| {m} | {k} | {n} | {layout} | {what} | {dtype_name} | "
                f"{flops / t_xla / 1e9:.0f} | {flops / t_nat / 1e9:.0f} | "
                f"{t_xla / t_nat:.2f}x |")
        lines.append(line)
        print(line, flush=True)

    def weights(shape, dtype, count):
        base = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        return [jnp.asarray(base if i == 0 else base * (1.0 + 1e-3 * i), dtype)
                for i in range(count)]

    shapes = [s for s in SHAPES if not args.what or s[3] in args.what]
    for dtype_name in args.dtype:
        dtype = jnp.dtype(dtype_name)
        for k, n, layout, what in shapes:
            count = copies(k * n * dtype.itemsize, args.cold, args.cold_mb)
            ws = weights((k, n) if layout == "kn" else (n, k), dtype, count)  # [K, N] / [N, K]
            xla_dot = ((lambda x, w: jnp.dot(x, w)) if layout == "kn"
                       else (lambda x, w: jnp.dot(x, w.T)))
            native_dot = lambda x, w, layout=layout: native.matmul(x, w, w_layout=layout)
            for m in args.m:
                x = jnp.asarray(rng.standard_normal((m, k)), dtype)  # [M, K]
                report(m, k, n, layout, what, dtype_name, 2.0 * m * k * n,
                       (xla_dot, native_dot), [(x, w) for w in ws])
        if not args.gated:
            continue
        k, f = 512, 1536
        count = copies(2 * k * f * dtype.itemsize, args.cold, args.cold_mb)
        wgs, wus = weights((k, f), dtype, count), weights((k, f), dtype, count)  # [K, F]
        xla_gated = lambda x, wg, wu: (jax.nn.silu(jnp.dot(x, wg)) * jnp.dot(x, wu)).astype(x.dtype)
        separate = lambda x, wg, wu: (  # the engine before: two GEMMs + XLA's elementwise
            jax.nn.silu(native.matmul(x, wg)) * native.matmul(x, wu)).astype(x.dtype)
        for m in args.m:
            x = jnp.asarray(rng.standard_normal((m, k)), dtype)  # [M, K]
            sets = [(x, wg, wu) for wg, wu in zip(wgs, wus)]
            report(m, k, f, "kn", "gated MLP (XLA)", dtype_name, 4.0 * m * k * f,
                   (xla_gated, native.gated_mlp), sets)
            report(m, k, f, "kn", "gated MLP (2 native + XLA silu*)", dtype_name,
                   4.0 * m * k * f, (separate, native.gated_mlp), sets)
        if dtype == jnp.bfloat16:
            k, n = 512, 32000
            ws = weights((n, k), dtype, copies(k * n * 2, args.cold, args.cold_mb))
            for m in args.m:
                x = jnp.asarray(rng.standard_normal((m, k)), dtype)  # [M, K]
                report(m, k, n, "nk", "LM head f32 out (native bf16 + astype)", dtype_name,
                       2.0 * m * k * n,
                       (lambda x, w: native.matmul(x, w, w_layout="nk").astype(jnp.float32),
                        lambda x, w: native.matmul(x, w, w_layout="nk",
                                                   out_dtype=jnp.float32)),
                       [(x, w) for w in ws])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def lm_head_argmax_main(args, rng):
    """--lm-head-argmax: ms per call of the fused LM head + argmax ("nk" on E [V, D], "kn" on
    E.T [D, V]) and of the unfused ones."""
    k, n = 512, 32000
    ms = args.m or (64, 256)
    mode = (f"cold: each loop rotates through >= {args.cold_mb:.0f} MB of distinct weights"
            if args.cold else "hot: one weight matrix, reused")
    lines = [f"CPU: {build.describe()}, jax {jax.__version__}, "
             f"jitted calls back to back, median of {args.repeats} timed loops; {mode}; "
             f"LM head D={k}, V={n} + argmax, ms per call", "",
             "| B | dtype | XLA dot f32 + argmax | native matmul nk f32 out + jnp.argmax | "
             "fused lm_head_argmax nk | fused nk vs matmul + argmax | "
             "fused lm_head_argmax kn | kn vs nk |",
             "|---:|:---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    # Each dot takes (h, E [V, D], E.T [D, V]) and reads the one its layout needs.
    unfused = lambda h, e, et: jnp.argmax(
        native.matmul(h, e, w_layout="nk", out_dtype=jnp.float32), axis=-1)
    xla = lambda h, e, et: jnp.argmax(
        jnp.dot(h, e.T, preferred_element_type=jnp.float32), axis=-1)
    fused_nk = lambda h, e, et: native.lm_head_argmax(h, e, w_layout="nk")
    fused_kn = lambda h, e, et: native.lm_head_argmax(h, et, w_layout="kn")
    for dtype_name in args.dtype:
        dtype = jnp.dtype(dtype_name)
        count = copies(k * n * dtype.itemsize, args.cold, args.cold_mb)
        base = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        es = [jnp.asarray(base if i == 0 else base * (1.0 + 1e-3 * i), dtype)
              for i in range(count)]  # [V, D] each
        ets = [jnp.asarray(np.ascontiguousarray(np.asarray(e).T)) for e in es]  # [D, V] each
        for m in ms:
            h = jnp.asarray(rng.standard_normal((m, k)), dtype)  # [B, D]
            dots = (unfused, fused_nk, fused_kn) if args.no_xla else (
                xla, unfused, fused_nk, fused_kn)
            times = seconds_per_call(dots, [(h, e, et) for e, et in zip(es, ets)],
                                     args.repeats)
            t_xla = float("nan") if args.no_xla else times[0]
            t_unfused, t_nk, t_kn = times[-3:]
            line = (f"| {m} | {dtype_name} | {t_xla * 1e3:.2f} | {t_unfused * 1e3:.2f} | "
                    f"{t_nk * 1e3:.2f} | {t_unfused / t_nk:.2f}x | {t_kn * 1e3:.2f} | "
                    f"{t_nk / t_kn:.2f}x |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
