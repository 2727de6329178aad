"""The engine's own jitted step around a loaded model, for parity tests.

`engine_step(model)` returns `step(kv_caches, input_ids [T], positions [T], metadata) ->
(logits, kv_caches)`: the runner's `forward` program (`runner.programs.make_programs`:
params as a flat list, sample links resolved, pools donated) followed by the LM head the
sampler programs apply, in float32: logits [B, V] of each sequence's last token, or with
`all_token_logits` [T, V] of every token (what prompt logprobs read).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.model.forward import compute_logits
from jaxserve.runner.programs import make_programs


def engine_step(model: nnx.Module, *, all_token_logits: bool = False,
                mesh: jax.sharding.Mesh | None = None) -> Callable:
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)

    def head(leaves, hidden):  # [..., D] -> [..., V] float32
        return compute_logits(graphdef, jax.tree.unflatten(treedef, leaves), hidden)

    head = jax.jit(head)
    programs = {}  # by R, the width of previous_ids: one program per batch width

    def step(kv_caches, input_ids, positions, metadata):
        num_seqs = metadata.seq_lens.shape[0]
        if num_seqs not in programs:
            programs[num_seqs] = make_programs(graphdef, treedef, max_num_seqs=num_seqs,
                                               mesh=mesh)
        no_links = jnp.zeros((num_seqs,), jnp.int32)  # [R]: no input id is a sample link
        last, every, kv_caches = programs[num_seqs].forward(leaves, kv_caches, input_ids,
                                                            positions, metadata, no_links)
        return head(leaves, every if all_token_logits else last), kv_caches

    return step
