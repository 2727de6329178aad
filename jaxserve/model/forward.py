"""The functional jit boundary: build a model, split it once, step it with a plain `jax.jit`.

`build_model` constructs a registered model (or, with `abstract=True`, only its shapes).
The caller splits it once (`graphdef, params = nnx.split(model)`); `make_forward(graphdef)`
returns a jitted `forward(params, kv_caches, input_ids, positions, metadata)` that merges
inside, donates the KV pools, and returns float32 logits of the tokens at
`metadata.logits_indices` (or of all T tokens, for prompt logprobs) with the updated pools.
"""

from collections.abc import Callable

import jax
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.ops import Ops
from jaxserve.model.registry import model_class

KVCaches = tuple[tuple[jax.Array, jax.Array], ...]  # per layer: ([K, L, S, H], [K, L, S, H])


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
                     ) -> jax.Array:  # [B] int32
    """Greedy sampling as a pure function: the argmax of the logits (fused on CPU)."""
    return nnx.merge(graphdef, params).greedy_token_ids(hidden, num_rows)


def make_forward(graphdef: nnx.GraphDef, *, all_token_logits: bool = False) -> Callable:
    """A jitted `forward(params, kv_caches, input_ids [T], positions [T], metadata)
    -> (logits [B, V] float32, kv_caches)`, the pools donated. With `all_token_logits`,
    the logits are those of every token: [T, V]."""

    def forward(params: nnx.State, kv_caches: KVCaches, input_ids, positions,
                metadata: AttentionMetadata) -> tuple[jax.Array, KVCaches]:
        model = nnx.merge(graphdef, params)
        hidden, kv_caches = model(kv_caches, input_ids, positions, metadata)  # [T, D]
        if not all_token_logits:
            hidden = hidden[metadata.logits_indices]  # [B, D]
        return model.compute_logits(hidden), kv_caches

    return jax.jit(forward, donate_argnums=(1,))
