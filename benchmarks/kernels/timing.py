"""Timing helpers for the kernel benchmarks: chained calls inside one jit, medians.

`time_chained(step, state, consts)` compiles one program that applies `step` `n` times,
each call consuming the last one's output (nothing can be hoisted or overlapped), and
returns the median per-call time over several runs after a warm-up. `copy_bandwidth()`
measures the device's read+write bandwidth with a large elementwise copy.
"""

import statistics
import time

import jax
import jax.numpy as jnp


def time_chained(step, state, consts=(), *, n: int = 20, repeats: int = 7,
                 donate: bool = False):
    """Median seconds per `state = step(state, consts, i)`; `i` is the call's static index.

    `consts` (e.g. the KV pools) are arguments, never closed over, so no large constant is
    baked into the program; `donate=True` lets `state` be updated in place.
    """
    def chain(state, consts):
        for i in range(n):  # the barrier keeps XLA from fusing one call into the next
            state = jax.lax.optimization_barrier(step(state, consts, i))
        return state

    fn = jax.jit(chain, donate_argnums=(0,) if donate else ())
    state = jax.block_until_ready(fn(state, consts))  # compile and warm up
    state = jax.block_until_ready(fn(state, consts))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(fn(state, consts))
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples), state


def copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """Bytes per second read plus written by a large on-device elementwise copy."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    seconds, _ = time_chained(lambda x, _, i: x + 1.0, x, n=10, repeats=5, donate=True)
    return 2 * num_bytes / seconds


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.device_kind} ({device.platform}, jax {jax.__version__})"
