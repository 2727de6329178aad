"""Native CPU ragged paged attention vs the pure-jnp reference (the old CPU backend).

Shapes of the issue-7 model (qwen2-40m: 8 query heads, 2 KV heads, head dim 64, pages of
16): decode batches at several contexts and one mixed step (decodes plus a prefill chunk),
float32 or bfloat16. Each row: median microseconds per call (calls chained in one jit) of
the reference and of the native kernel built for each `--march` (default
$JAXSERVE_CPU_MARCH, else native; e.g. `--march native x86-64-v3 x86-64-v2` puts the
AVX-512, AVX2 and portable builds side by side), and the speed-up of the first build over
the reference; `MB` is the K/V bytes the batch's contexts hold (what a kernel must read).

    JAX_PLATFORMS=cpu python benchmarks/kernels/bench_cpu_attention.py [--march ...]
"""

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.kernels.timing import time_chained  # noqa: E402
from pallas_kernels.cpu import build  # noqa: E402
from pallas_kernels.ragged_paged_attention import cpu, reference_attention  # noqa: E402


def make_batch(q_lens, kv_lens, *, heads=(8, 2), head_dim=64, page_size=16, dtype, seed=0):
    rng = np.random.default_rng(seed)
    num_heads, num_kv_heads = heads
    pages_needed = [-(-kv // page_size) for kv in kv_lens]
    pages_per_seq = max(pages_needed)
    num_pages = 1 + sum(pages_needed)
    order = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((len(q_lens), pages_per_seq), np.int32)
    used = 0
    for b, n in enumerate(pages_needed):
        table[b, :n] = order[used:used + n]
        used += n
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k = rng.standard_normal(shape, np.float32)
    v = rng.standard_normal(shape, np.float32)
    q = rng.standard_normal((sum(q_lens), num_heads, head_dim), np.float32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(table), jnp.asarray(np.asarray(kv_lens, np.int32)), jnp.asarray(qsl))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--n", type=int, default=10, help="calls chained per timing")
    parser.add_argument("--march", nargs="*", default=[None],
                        help="build targets of the native kernel (default: the environment's)")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    marches = [build.resolve_march(m) for m in args.march]
    cases = [(f"decode B={b} ctx={c}", [1] * b, [c] * b)
             for b, c in ((1, 512), (16, 256), (64, 200), (64, 1024), (128, 256))]
    cases.append(("mixed 14x1k decode + 512 prefill", [1] * 14 + [512], [1024] * 14 + [512]))
    cases.append(("prefill chunk 512 after 1.5k hit", [512], [2048]))
    print(f"CPU: {build.describe(marches[0])}; {args.dtype}\n")
    kernels = " | ".join(f"{m} us" for m in marches)
    print(f"| case | T | MB | reference us | {kernels} | speed-up |\n"
          f"|---|---|---|---|{'---|' * len(marches)}---|")
    for name, q_lens, kv_lens in cases:
        batch = make_batch(q_lens, kv_lens, dtype=dtype)
        q, consts = batch[0], batch[1:]
        mb = sum(kv_lens) * 2 * 2 * 64 * dtype.itemsize / 1e6
        fns = [reference_attention] + [
            functools.partial(cpu.ragged_paged_attention, march=m) for m in marches]
        times = []
        for fn in fns:
            step = lambda q, c, i, fn=fn: fn(q, *c, sm_scale=0.125)  # noqa: E731
            seconds, _ = time_chained(step, q, consts, n=args.n, repeats=5)
            times.append(seconds * 1e6)
        cells = " | ".join(f"{t:.0f}" for t in times[1:])
        print(f"| {name} | {q.shape[0]} | {mb:.1f} | {times[0]:.0f} | {cells} | "
              f"{times[0] / times[1]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
