"""The GPU kernel, compiled for the real device, against the reference on poisoned batches.

The CPU tests interpret the kernel; this runs the Triton build on the same kind of batches
(NaN in every unreadable slot, shuffled tables, decode, prefill, prefix hits, padding) at
each dtype, head dim, page size, GQA ratio and option the entry point supports.
Usage: PYTHONPATH=. python benchmarks/kernels/check_gpu_kernel.py (interprets on CPU).
"""

import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

sys.path.insert(0, "tests/pallas_kernels")
from conftest import build_batch  # noqa: E402  (the tests' poisoned-batch builder)

from pallas_kernels.ragged_paged_attention import ragged_paged_attention, reference_attention

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
MIXED = ([1, 1, 37, 5, 0, 1], [300, 17, 37, 90, 0, 64], 64)  # q_lens, kv_lens, T
# (dtype, (N, K, H), page size, batch, options)
CASES = [
    (jnp.float32, (12, 2, 128), 16, MIXED, {}),
    (jnp.bfloat16, (12, 2, 128), 16, MIXED, {}),
    (jnp.bfloat16, (28, 4, 128), 16, MIXED, {}),
    (jnp.bfloat16, (8, 1, 64), 32, MIXED, {}),
    (jnp.bfloat16, (4, 4, 256), 64, MIXED, {}),
    (jnp.float32, (4, 2, 256), 16, MIXED, {}),
    (jnp.float32, (28, 4, 64), 64, MIXED, dict(sliding_window=40, soft_cap=20.0)),
    (jnp.bfloat16, (6, 1, 128), 16, MIXED, dict(num_splits=4, block_n=32)),
    (jnp.bfloat16, (12, 2, 128), 16, ([1] * 8, [700 + 13 * i for i in range(8)], 8), {}),
    (jnp.bfloat16, (12, 2, 128), 16, ([256, 128], [256, 1000], 384), dict(block_q=16)),
]


def main() -> int:
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    failures, on_cpu = 0, jax.default_backend() == "cpu"  # on CPU: interpret mode
    for dtype, (n, k, h), page_size, (q_lens, kv_lens, num_tokens), options in CASES:
        batch = build_batch(q_lens, kv_lens, num_heads=n, num_kv_heads=k, head_dim=h,
                            page_size=page_size, num_tokens=num_tokens, dtype=dtype)
        knobs = {name: options[name] for name in options
                 if name not in ("sliding_window", "soft_cap")}
        extras = {name: options[name] for name in ("sliding_window", "soft_cap")
                  if name in options}
        start = time.perf_counter()
        try:
            out = ragged_paged_attention(*batch, sm_scale=h ** -0.5, backend="gpu",
                                         interpret=on_cpu, **extras, **knobs)
            out = np.asarray(jax.block_until_ready(out), np.float32)
        except Exception as e:  # report and go on: one broken variant must not hide others
            failures += 1
            print(f"FAIL {jnp.dtype(dtype).name} N={n} K={k} H={h} S={page_size} {options}: "
                  f"{type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        seconds = time.perf_counter() - start
        with jax.default_matmul_precision("highest"):
            f32 = [x.astype(jnp.float32) for x in batch[:3]]
            ref = np.asarray(reference_attention(*f32, *batch[3:], sm_scale=h ** -0.5,
                                                 **extras))
        real = int(np.asarray(batch[5])[-1])
        tol = TOLERANCE[jnp.dtype(dtype).name]
        err = float(np.max(np.abs(out[:real] - ref[:real])))
        ok = (np.isfinite(out).all() and not out[real:].any()
              and np.allclose(out[:real], ref[:real], atol=tol, rtol=tol))
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {jnp.dtype(dtype).name} N={n} K={k} H={h} "
              f"S={page_size} T={num_tokens} {options}: max abs err {err:.2e} "
              f"(first call {seconds:.1f} s)", flush=True)
    print(f"{len(CASES) - failures}/{len(CASES)} GPU kernel checks passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
