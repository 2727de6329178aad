"""Ragged paged attention on this device: correctness per case, then time and bandwidth.

Cases: Qwen2.5-1.5B / 7B heads, decode at batch {1, 16, 64} x context {256, 1k, 4k}, and one
mixed batch per model; the Pallas kernel, the jnp reference and JAX's decode-only
`paged_attention` are each checked, then timed (GB/s moved, % of measured copy bandwidth).
Run from the repo root with PYTHONPATH=. (--out F.md, --sweep, --floor); CPU: tiny, interpreted.
"""

import argparse
import json
import math
import time

import numpy as np

import jax
import jax.numpy as jnp

import timing
from pallas_kernels.ragged_paged_attention import gpu, kv_pool_shape, reference_attention

try:
    from jax.experimental.pallas.ops.gpu import paged_attention as peer_ops
except ImportError:  # the peer may leave a future JAX
    peer_ops = None

MODELS = {"1.5B": (12, 2, 128), "7B": (28, 4, 128)}  # q heads, kv heads, head dim
PAGE_SIZE = 16
L2_BYTES = 50 << 20


def make_case(model, q_lens, kv_lens, *, dtype, num_sets=None, seed=0):
    """Device arrays of one batch; `num_sets` copies of its pages so timed calls rotate
    through more memory than the L2 holds."""
    num_heads, num_kv_heads, head_dim = MODELS[model]
    num_seqs, itemsize = len(q_lens), jnp.dtype(dtype).itemsize
    num_tokens = -(-sum(q_lens) // 16) * 16 if max(q_lens) > 1 else num_seqs
    pages_per_seq = -(-max(kv_lens) // PAGE_SIZE)
    kv_bytes = 2 * sum(kv_lens) * num_kv_heads * head_dim * itemsize
    if num_sets is None:
        num_sets = min(8, max(2, math.ceil(4 * L2_BYTES / kv_bytes)))
    rng = np.random.default_rng(seed)
    num_pages = 1 + num_sets * num_seqs * pages_per_seq
    pages = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    pages = pages.reshape(num_sets, num_seqs, pages_per_seq)
    keys = jax.random.split(jax.random.key(seed), 3)
    shape = kv_pool_shape(num_kv_heads, num_pages, PAGE_SIZE, head_dim)
    q_bytes = num_tokens * num_heads * head_dim * itemsize
    return dict(
        q=jax.random.normal(keys[0], (num_tokens, num_heads, head_dim), dtype),
        k=jax.random.normal(keys[1], shape, dtype), v=jax.random.normal(keys[2], shape, dtype),
        pages=jnp.asarray(pages), lens=jnp.asarray(np.asarray(kv_lens, np.int32)),
        qsl=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)),
        num_real=sum(q_lens), decode=max(q_lens) == 1 and num_tokens == num_seqs,
        bytes=kv_bytes + 2 * q_bytes + pages[0].nbytes + 8 * num_seqs, sm_scale=head_dim ** -0.5)


def make_impls(interpret: bool, knobs: dict):
    """name -> fn(q, k, v, pages, lens, qsl, sm_scale) -> [T, N, H]."""
    impls = {
        "pallas": lambda q, k, v, p, n, s, sc: gpu.ragged_paged_attention(
            q, k, v, p, n, s, sm_scale=sc, interpret=interpret, **knobs),
        "reference": lambda q, k, v, p, n, s, sc: reference_attention(
            q, k, v, p, n, s, sm_scale=sc),
    }
    if peer_ops is not None:  # decode only; it takes no scale, so the query is pre-scaled
        impls["jax_paged_attention"] = lambda q, k, v, p, n, s, sc: peer_ops.paged_attention(
            q * jnp.asarray(sc, q.dtype), k, v, p, n, interpret=interpret,
            k_splits=min(16, p.shape[1]), pages_per_compute_block=min(8, p.shape[1]))
    return impls


def run_case(case, impls, *, n, repeats, bandwidth):
    """Checks every impl against the float32 reference (error: ||out - ref|| / ||ref|| over
    real rows), then times each."""
    args = (case["k"], case["v"], case["pages"], case["lens"], case["qsl"])
    real = case["num_real"]
    f32 = [case[name].astype(jnp.float32) for name in ("q", "k", "v")]
    with jax.default_matmul_precision("highest"):  # float32 ground truth
        ref = reference_attention(*f32, case["pages"][0], case["lens"], case["qsl"],
                                  sm_scale=case["sm_scale"])[:real]
    del f32
    ref_norm = float(jnp.linalg.norm(ref))
    limit = 1e-2 if case["q"].dtype == jnp.bfloat16 else 1e-5
    row = {}
    for name, fn in impls.items():
        if name == "jax_paged_attention" and not case["decode"]:
            continue
        try:
            out = fn(case["q"], args[0], args[1], args[2][0], *args[3:], case["sm_scale"])
            err = float(jnp.linalg.norm(out[:real].astype(jnp.float32) - ref)) / ref_norm
            finite = bool(jnp.isfinite(out).all())

            def step(q, consts, i, fn=fn):
                k, v, pages, lens, qsl = consts
                return fn(q, k, v, pages[i % pages.shape[0]], lens, qsl, case["sm_scale"])

            seconds, _ = timing.time_chained(step, case["q"], args, n=n, repeats=repeats)
            row[name] = dict(us=seconds * 1e6, gbps=case["bytes"] / seconds / 1e9,
                             pct=100 * case["bytes"] / seconds / bandwidth, err=err,
                             ok=finite and err < limit)
        except Exception as e:  # one impl failing must not hide the others' numbers
            row[name] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    return row


def format_table(rows, impls) -> str:
    head = "| model | batch | context | T | MB moved |"
    rule = "|---|---|---|---|---|"
    for name in impls:
        head += f" {name} us | GB/s | % copy | rel err |"
        rule += "---|---|---|---|"
    lines = [head, rule]
    for r in rows:
        line = f"| {r['model']} | {r['batch']} | {r['context']} | {r['T']} | {r['mb']:.1f} |"
        for name in impls:
            m = r["results"].get(name)
            if m is None or "error" in m:
                line += " n/a | | | |" if m is None else f" error | | | {m['error'][:40]} |"
            else:
                flag = "" if m["ok"] else " FAIL"
                line += (f" {m['us']:.1f} | {m['gbps']:.0f} | {m['pct']:.0f}% |"
                         f" {m['err']:.1e}{flag} |")
        lines.append(line)
    return "\n".join(lines)


def sweep(bandwidth, *, dtype, budget, started):
    """Times a few launch configurations of the Pallas kernel on two decode cases (GPU)."""
    configs = [dict(num_splits=ns) for ns in (1, 2, 4, 8, 16)]
    configs += [dict(block_n=bn, num_warps=w, num_stages=st)
                for bn, w, st in ((32, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 3))]
    lines = ["| case | knobs | us | % copy |", "|---|---|---|---|"]
    for model, batch, context in (("7B", 64, 1024), ("1.5B", 16, 4096)):
        case = make_case(model, [1] * batch, [context] * batch, dtype=dtype)
        for knobs in [{}] + configs:
            if time.perf_counter() - started > budget:
                break
            impl = {"pallas": make_impls(False, knobs)["pallas"]}
            m = run_case(case, impl, n=10, repeats=5, bandwidth=bandwidth)["pallas"]
            text = (f"error | {m['error'][:80]}" if "error" in m else
                    f"{m['us']:.1f} | {m['pct']:.0f}%{'' if m['ok'] else ' FAIL'}")
            lines.append(f"| {model} B={batch} ctx={context} | {knobs or 'default'} | {text} |")
            print(lines[-1], flush=True)
        del case
    return "\n".join(lines)


def launch_floor(bandwidth, *, dtype) -> str:
    """Per-call time of a trivial Pallas Triton kernel in this harness, next to the kernel
    on a near-empty batch with and without the split merge: the fixed cost of a call."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def copy_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1

    copy = pl.pallas_call(copy_kernel, out_shape=jax.ShapeDtypeStruct((64, 128), dtype),
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1))
    seconds, _ = timing.time_chained(lambda x, _, i: copy(x), jnp.zeros((64, 128), dtype))
    lines = ["| call | us |", "|---|---|",
             f"| trivial Pallas Triton kernel | {seconds * 1e6:.1f} |"]
    for model, batch, context in (("1.5B", 1, 256), ("7B", 64, 256)):
        case = make_case(model, [1] * batch, [context] * batch, dtype=dtype)
        for knobs in ({}, dict(num_splits=1)):
            impl = {"pallas": make_impls(False, knobs)["pallas"]}
            m = run_case(case, impl, n=20, repeats=7, bandwidth=bandwidth)["pallas"]
            lines.append(f"| {model} B={batch} ctx={context} {knobs or 'default'} | "
                         f"{m.get('us', float('nan')):.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the table (markdown) and raw rows (.json) here")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds; skip rest")
    parser.add_argument("--sweep", action="store_true", help="time launch configs instead")
    parser.add_argument("--floor", action="store_true", help="time the fixed cost of a call")
    opts = parser.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.dtype(opts.dtype)
    if on_cpu:  # interpret mode: a tiny grid, few runs
        batches, contexts, n, repeats, copy_bytes = (1, 2), (32, 80), 2, 1, 64 << 20
    else:
        batches, contexts, n, repeats, copy_bytes = (1, 16, 64), (256, 1024, 4096), 20, 7, 2 << 30
    started = time.perf_counter()
    bandwidth = timing.copy_bandwidth(copy_bytes)
    print(f"device: {timing.device_name()}; copy bandwidth (read + write): "
          f"{bandwidth / 1e9:.0f} GB/s", flush=True)
    if opts.sweep or opts.floor:
        table = (sweep(bandwidth, dtype=dtype, budget=opts.time_budget, started=started)
                 if opts.sweep else launch_floor(bandwidth, dtype=dtype))
        print("\n" + table, flush=True)
        if opts.out:
            with open(opts.out, "w") as f:
                f.write(table + "\n")
        return
    impls = make_impls(on_cpu, {})
    plan = [(m, [1] * b, [c] * b) for m in MODELS for b in batches for c in contexts]
    chunk = 16 if on_cpu else 512  # mixed: 14 decodes, one prefill, one prefix-hit chunk
    plan += [(m, [1] * 14 + [chunk, chunk], [contexts[1]] * 14 + [chunk, contexts[1] + chunk])
             for m in MODELS]
    rows = []
    for model, q_lens, kv_lens in plan:
        if time.perf_counter() - started > opts.time_budget:
            print(f"time budget spent: skipping {model} B={len(q_lens)}", flush=True)
            continue
        case = make_case(model, q_lens, kv_lens, dtype=dtype)
        results = run_case(case, impls, n=n, repeats=repeats, bandwidth=bandwidth)
        rows.append(dict(model=model, batch=len(q_lens), context=max(kv_lens),
                         T=case["q"].shape[0], mb=case["bytes"] / 1e6, results=results))
        print(format_table(rows[-1:], impls).splitlines()[-1], flush=True)
        del case
    table = (f"Device: {timing.device_name()}; measured copy bandwidth "
             f"{bandwidth / 1e9:.0f} GB/s (read + write). dtype {dtype.name}, page size "
             f"{PAGE_SIZE}; times are medians per call of {n} chained calls x {repeats}.\n\n"
             + format_table(rows, impls))
    print("\n" + table, flush=True)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(table + "\n")
        with open(opts.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(dict(device=timing.device_name(), copy_gbps=bandwidth / 1e9, rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
