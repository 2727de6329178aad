"""The functional jit boundary: build a model; run it as pure functions of its params.

`build_model` constructs a registered model (or, with `abstract=True`, only its shapes).
The caller splits it once (`graphdef, params = nnx.split(model)`); `run_model`,
`compute_logits` and `greedy_token_ids` merge inside, so a jitted program
(`runner/programs.py`) takes the params as plain arrays.
"""

import jax
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.ops import Ops
from jaxserve.model.registry import model_class

# per layer: ([K, L, S, H], [K, L, S, H]), 8-bit pools followed by two [K, L, S, 1] scale
# pools, or MLA's one latent pool (runner/kv_cache.py's layer_pool_shapes)
KVCaches = tuple[tuple[jax.Array, ...], ...]


def build_model(model_config: ModelConfig, *, ops: Ops = Ops(),
                rngs: nnx.Rngs | None = None, abstract: bool = False) -> nnx.Module:
    """The model for `model_config.architecture` running `ops` (default: XLA's ops and the
    reference attention), randomly initialised, or with `abstract=True` made of
    ShapeDtypeStructs only (no initialiser ever runs; the layers get `rngs=None` and trace
    zeros, see `layers.init_normal`)."""
    cls = model_class(model_config.architecture)

    def make() -> nnx.Module:
        chosen = None if abstract else (rngs if rngs is not None else nnx.Rngs(0))
        return cls(model_config, ops=ops, rngs=chosen)

    return nnx.eval_shape(make) if abstract else make()


def run_model(graphdef: nnx.GraphDef, params: nnx.State, kv_caches: KVCaches,
              input_ids,  # [T] int32
              positions,  # [T] int32
              metadata: AttentionMetadata,
              ) -> tuple[jax.Array, KVCaches]:  # [T, D] final hidden states, updated pools
    """One model step as a pure function, for callers that build their own jitted step."""
    return nnx.merge(graphdef, params)(kv_caches, input_ids, positions, metadata)


def compute_logits(graphdef: nnx.GraphDef, params: nnx.State,
                   hidden,  # [..., D] final hidden states
                   num_rows=None,  # [] int32 real rows of hidden (the rest is padding)
                   ) -> jax.Array:  # [..., V] float32
    """The LM head (tied or not) as a pure function."""
    return nnx.merge(graphdef, params).compute_logits(hidden, num_rows)


def greedy_token_ids(graphdef: nnx.GraphDef, params: nnx.State,
                     hidden,  # [B, D] final hidden states
                     num_rows,  # [] int32 real rows of hidden (the rest is padding)
                     bitmask=None,  # [B, W] int32 allowed ids (structured outputs), or None
                     ) -> jax.Array:  # [B] int32
    """Greedy sampling as a pure function: the argmax of the logits, over the ids `bitmask`
    allows if given (fused with the LM head on CPU)."""
    return nnx.merge(graphdef, params).greedy_token_ids(hidden, num_rows, bitmask)
