"""KV write on this device: a separate scatter into the donated pools vs a fused write.

Qwen2.5-7B heads, bf16: the scatter of T new tokens' K and V into both pools (pools donated,
so in place; as `[K, P*S, H]` columns and as unique rows of `[K*P*S, H]`), a decode step's
attention alone and with the scatter; a fused write's floor is new bytes / copy bandwidth.
Usage: PYTHONPATH=. python benchmarks/kernels/bench_kv_write.py [--out F.md]
"""

import argparse

import numpy as np

import jax
import jax.numpy as jnp

import timing
from pallas_kernels.ragged_paged_attention import gpu, kv_pool_shape

NUM_KV_HEADS, HEAD_DIM, NUM_HEADS, PAGE_SIZE = 4, 128, 28, 16


def write_kv(k_pool,  # [K, P, S, H]
             v_pool,  # [K, P, S, H]
             new_k,   # [T, K, H]
             new_v,   # [T, K, H]
             slots,   # [T] int32 flat slot page * S + offset of each new token
             ) -> tuple[jax.Array, jax.Array]:
    """The separate KV write: one scatter per pool into its [K, P*S, H] view."""
    k, p, s, h = k_pool.shape
    k_pool = k_pool.reshape(k, p * s, h).at[:, slots].set(new_k.transpose(1, 0, 2))
    v_pool = v_pool.reshape(k, p * s, h).at[:, slots].set(new_v.transpose(1, 0, 2))
    return k_pool.reshape(k, p, s, h), v_pool.reshape(k, p, s, h)


def write_kv_rows(k_pool, v_pool, new_k, new_v, slots):
    """The same write as one scatter of unique [H] rows per pool into its [K*P*S, H] view."""
    k, p, s, h = k_pool.shape
    rows = (jnp.arange(k, dtype=jnp.int32)[None, :] * (p * s) + slots[:, None]).reshape(-1)
    k_pool = k_pool.reshape(k * p * s, h).at[rows].set(
        new_k.reshape(-1, h), unique_indices=True, mode="promise_in_bounds")
    v_pool = v_pool.reshape(k * p * s, h).at[rows].set(
        new_v.reshape(-1, h), unique_indices=True, mode="promise_in_bounds")
    return k_pool.reshape(k, p, s, h), v_pool.reshape(k, p, s, h)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="append the table (markdown) to this file")
    opts = parser.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    batch, context, num_sets = (4, 64, 2) if on_cpu else (64, 1024, 4)
    pages_per_seq = context // PAGE_SIZE
    num_pages = 1 + num_sets * batch * pages_per_seq
    rng = np.random.default_rng(0)
    keys = jax.random.split(jax.random.key(0), 4)
    shape = kv_pool_shape(NUM_KV_HEADS, num_pages, PAGE_SIZE, HEAD_DIM)
    pools = (jax.random.normal(keys[0], shape, jnp.bfloat16),
             jax.random.normal(keys[1], shape, jnp.bfloat16))
    bandwidth = timing.copy_bandwidth(64 << 20 if on_cpu else 2 << 30)
    n, repeats = (2, 1) if on_cpu else (20, 7)
    lines = [f"KV write, {timing.device_name()}, copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
             f"Qwen2.5-7B heads, bf16, pool {2 * pools[0].nbytes / 1e9:.2f} GB (K + V)", "",
             "| new tokens T | scatter us (both pools, donated) | row scatter us | "
             "fused floor us | attention us | attention + scatter us | scatter share |",
             "|---|---|---|---|---|---|---|"]
    pages = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    pages = jnp.asarray(pages.reshape(num_sets, batch, pages_per_seq))
    lens = jnp.full((batch,), context, jnp.int32)
    qsl = jnp.arange(batch + 1, dtype=jnp.int32)
    for num_new in (batch, 16 if on_cpu else 2048):
        slots = jnp.asarray(np.stack([rng.choice(num_pages * PAGE_SIZE, num_new, replace=False)
                                      for _ in range(num_sets)]).astype(np.int32))
        new = jax.random.normal(keys[2], (2, num_new, NUM_KV_HEADS, HEAD_DIM), jnp.bfloat16)

        def scatter(state, consts, i):
            return write_kv(*state, consts[0][0], consts[0][1], consts[1][i % num_sets])

        t_write, pools = timing.time_chained(scatter, pools, (new, slots), n=n,
                                             repeats=repeats, donate=True)
        t_rows, pools = timing.time_chained(
            lambda st, c, i: write_kv_rows(*st, c[0][0], c[0][1], c[1][i % num_sets]),
            pools, (new, slots), n=n, repeats=repeats, donate=True)
        floor = 2 * 2 * new[0].nbytes / bandwidth  # read + write of the new K and V
        row = f"| {num_new} | {t_write * 1e6:.1f} | {t_rows * 1e6:.1f} | {floor * 1e6:.2f} |"
        if num_new == batch:  # a decode step: one new token per sequence
            q = jax.random.normal(keys[3], (batch, NUM_HEADS, HEAD_DIM), jnp.bfloat16)

            def attend(state, consts, i, write=False):
                q, k_pool, v_pool = state
                if write:
                    k_pool, v_pool = write_kv(k_pool, v_pool, consts[0][0], consts[0][1],
                                              consts[1][i % num_sets])
                out = gpu.ragged_paged_attention(
                    q, k_pool, v_pool, consts[2][i % num_sets], consts[3], consts[4],
                    sm_scale=HEAD_DIM ** -0.5, interpret=on_cpu)
                return out, k_pool, v_pool

            consts = (new, slots, pages, lens, qsl)
            t_attn, (q, *pools) = timing.time_chained(attend, (q, *pools), consts, n=n,
                                                      repeats=repeats, donate=True)
            t_both, (q, *pools) = timing.time_chained(
                lambda s, c, i: attend(s, c, i, write=True), (q, *pools), consts, n=n,
                repeats=repeats, donate=True)
            row += (f" {t_attn * 1e6:.1f} | {t_both * 1e6:.1f} |"
                    f" {100 * (t_both - t_attn) / t_both:.0f}% |")
        else:
            row += " | | |"
        lines.append(row)
        print(row, flush=True)
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    if opts.out:
        with open(opts.out, "a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
