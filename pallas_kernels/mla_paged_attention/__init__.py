"""Multi-head latent attention (DeepSeek-V2's MLA) over a paged pool of compressed KV latents.

The pool layout is declared here, once: per layer one pool `[P, S, C + Hr]` (pages, page
size, latent width): each token keeps its normalized KV latent (`kv_lora_rank` = C values)
followed by its RoPE key (`qk_rope_head_dim` = Hr values), shared by every query head. Only
the reference exists so far; see `reference.py` for why the GPU/TPU kernels do not serve it.
"""

from pallas_kernels.mla_paged_attention.reference import mla_paged_attention


def latent_pool_shape(num_pages: int, page_size: int, latent_dim: int) -> tuple[int, ...]:
    """Shape of one layer's latent pool: [P, S, C + Hr]."""
    return (num_pages, page_size, latent_dim)


__all__ = ["latent_pool_shape", "mla_paged_attention"]
