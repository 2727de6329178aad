"""Ragged paged attention: the public entry point and the page-pool layout.

The pool layout is declared here, once, because the kernels choose it: per layer one key
pool and one value pool, each `[K, P, S, H]` (KV heads, pages, page size, head dim): a KV
head's page is one contiguous `[S, H]` tile (one async copy on TPU, coalesced loads on GPU, contiguous rows for the CPU
kernel) and TP shards axis 0. `ragged_paged_attention` checks shapes and picks a kernel by
platform: Pallas on GPU and TPU, the native C++ kernel on CPU (the reference without a
C++ compiler).
"""

import jax
import jax.numpy as jnp

# gpu / tpu import Pallas' Triton and Mosaic front ends (about 0.5 s on a 2-core CPU): only
# when one of them runs
from pallas_kernels.ragged_paged_attention import cpu
from pallas_kernels.ragged_paged_attention.kv_quant import check_scales
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention as reference_attention

BACKENDS = ("gpu", "tpu", "cpu", "reference")
_KNOBS = {"gpu": ("block_q", "block_n", "num_splits", "num_warps", "num_stages"),
          "tpu": ("block_q", "pages_per_block", "vmem_limit_bytes"),
          "cpu": (), "reference": ("pages_per_chunk",)}
_HEAD_DIMS = (64, 128, 256)


def kv_pool_shape(num_kv_heads: int, num_pages: int, page_size: int, head_dim: int) -> tuple[int, ...]:
    """Shape of one layer's key pool (and, identically, its value pool): [K, P, S, H]."""
    return (num_kv_heads, num_pages, page_size, head_dim)


def default_backend(x: jax.Array | None = None) -> str:
    """"gpu", "tpu" or "cpu" from `x`'s devices when concrete, else JAX's default platform.

    CPU gets the native kernel when it builds here (a C++ compiler), else "reference".
    """
    platform = jax.default_backend()
    try:
        platform = next(iter(x.devices())).platform
    except (AttributeError, TypeError):  # None, a numpy array, or a tracer under jit
        pass
    kernel = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(platform)
    if kernel is None:
        kernel = "cpu" if cpu.available() else "reference"
    return kernel


def check_shapes(q, k_pages, v_pages, page_indices, seq_lens, query_start_loc, *,
                 backend: str, alibi_slopes=None, k_scales=None, v_scales=None) -> None:
    """Raises ValueError naming the first static mismatch between the arguments."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q.shape}")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [K, P, S, H], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
    (_, num_heads, head_dim), (num_kv_heads, _, page_size, kv_head_dim) = q.shape, k_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"k_pages head_dim {kv_head_dim} != q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"q heads {num_heads} is not a multiple of kv heads {num_kv_heads}")
    if page_indices.ndim != 2:
        raise ValueError(f"page_indices must be [B, pages_per_seq], got {page_indices.shape}")
    num_seqs = page_indices.shape[0]
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens shape {seq_lens.shape} != ({num_seqs},) (B of page_indices)")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc shape {query_start_loc.shape} != "
                         f"({num_seqs + 1},) (B + 1 of page_indices)")
    for name, x in (("page_indices", page_indices), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):
        if x.dtype != jnp.int32:
            raise ValueError(f"{name} dtype {x.dtype} != int32")
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"q dtype {q.dtype} is not float32 or bfloat16")
    check_scales(k_pages, v_pages, k_scales, v_scales)
    if k_scales is None and k_pages.dtype != q.dtype:
        raise ValueError(f"k_pages dtype {k_pages.dtype} != q dtype {q.dtype}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
        raise ValueError(f"alibi_slopes shape {tuple(alibi_slopes.shape)} != ({num_heads},) "
                         f"(one slope per q head)")
    if backend in ("reference", "cpu"):
        return
    if head_dim not in _HEAD_DIMS:
        raise ValueError(f"q head_dim {head_dim} not in {_HEAD_DIMS} ({backend} kernel)")
    narrowest = min(q.dtype.itemsize, k_pages.dtype.itemsize)
    sublanes = 8 * (4 // narrowest)
    if backend == "tpu" and page_size % sublanes:
        raise ValueError(f"k_pages page_size {page_size} is not a multiple of {sublanes} "
                         f"({k_pages.dtype} pages / {q.dtype} queries: the sublane tile of "
                         "the tpu kernel)")


def ragged_paged_attention(
    q,                # [T, N, H] queries of every scheduled token
    k_pages,          # [K, P, S, H] key pool (P pages of S tokens)
    v_pages,          # [K, P, S, H] value pool
    page_indices,     # [B, pages_per_seq] int32 page ids of each sequence's context
    seq_lens,         # [B] int32 context length of each sequence, this step's tokens included
    query_start_loc,  # [B+1] int32 first token of each sequence in T; padding seqs are empty
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    alibi_slopes=None,  # [N] float32 ALiBi slope of each query head, or None
    k_scales=None,      # [K, P, S, 1] float16 with 8-bit pools (kv_quant.py), else None
    v_scales=None,      # [K, P, S, 1] float16, or None
    interpret: bool = False,
    backend: str | None = None,
    block_q: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    pages_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    pages_per_chunk: int | None = None,
) -> jax.Array:       # [T, N, H]; rows of padding tokens are zero
    """Causal attention of each sequence's new tokens over its paged context.

    Semantics are the reference's (`reference_attention`), ALiBi included: with
    `alibi_slopes`, head `n` adds `alibi_slopes[n] * (key_pos - query_pos)` to its scores.
    float8_e4m3fn or int8 pools come with their per-row scales (`k_scales`, `v_scales`;
    the format is kv_quant.py's) and every backend reads them dequantized.
    `backend` is "gpu" (Pallas
    Triton), "tpu" (Pallas Mosaic), "cpu" (the native C++ kernel) or "reference" (pure
    jnp); None picks by the platform of `q` or of JAX's default backend (`default_backend`).
    `interpret=True` runs a Pallas kernel on CPU. Tuning knobs (None: the kernel's default), per backend: gpu `block_q`,
    `block_n`, `num_splits`, `num_warps`, `num_stages`; tpu `block_q`, `pages_per_block`,
    `vmem_limit_bytes`; reference `pages_per_chunk`. Setting another backend's knob is an
    error.
    """
    backend = backend or default_backend(q)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} not in {BACKENDS}")
    knobs = dict(block_q=block_q, block_n=block_n, num_splits=num_splits, num_warps=num_warps,
                 num_stages=num_stages, pages_per_block=pages_per_block,
                 vmem_limit_bytes=vmem_limit_bytes, pages_per_chunk=pages_per_chunk)
    knobs = {name: value for name, value in knobs.items() if value is not None}
    stray = sorted(set(knobs) - set(_KNOBS[backend]))
    if stray:
        raise ValueError(f"knobs {stray} do not apply to the {backend} backend "
                         f"(it takes {_KNOBS[backend]})")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window {sliding_window} must be positive")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap {soft_cap} must be positive")
    check_shapes(q, k_pages, v_pages, page_indices, seq_lens, query_start_loc, backend=backend,
                 alibi_slopes=alibi_slopes, k_scales=k_scales, v_scales=v_scales)
    args = (q, k_pages, v_pages, page_indices, seq_lens, query_start_loc)
    kwargs = dict(sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
                  alibi_slopes=alibi_slopes, k_scales=k_scales, v_scales=v_scales)
    if backend == "reference":
        return reference_attention(*args, **kwargs, **knobs)
    if backend == "cpu":
        return cpu.ragged_paged_attention(*args, **kwargs)
    if backend == "gpu":
        from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention as kernel
    else:
        from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention as kernel
    return kernel(*args, **kwargs, interpret=interpret, **knobs)


__all__ = ["BACKENDS", "check_shapes", "default_backend", "kv_pool_shape",
           "ragged_paged_attention", "reference_attention"]
