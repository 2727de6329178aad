"""The jitted programs the runner compiles, as plain functions of (params, arrays).

The model is merged from its graphdef inside each program (split once, outside), and the
params arrive as a flat list of arrays (`param_treedef` rebuilds the NNX state inside):
flattening NNX variables on every call costs host time on every step. The KV
pools are donated to `forward`, so the cache is updated in place. `forward` hands back the
hidden states of each sequence's last token (for sampling) and of every token (for prompt
logprobs); the LM head runs in the sampler programs, whose shapes depend on B only.
Under a mesh the logits are gathered (replicated) before sampling, as with one device.
Async scheduling: a sampler also returns its token ids padded to [R] (R = the largest
sequence bucket), and `forward` takes such an array of the step before as `previous_ids`:
a negative input id is a sample link (`sample_links.py`), -1 - i for the token that step
sampled for its sequence i, still on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxserve.model.sampling import sampler
from jaxserve.model.forward import compute_logits, greedy_token_ids, run_model
from jaxserve.runner.sample_links import resolve_sample_links
from jaxserve.runner.sampling_rows import SAMPLER_VARIANTS


@dataclasses.dataclass(frozen=True)
class Programs:
    # params: the list of parameter arrays, `jax.tree.leaves(state)`
    # (params, kv_caches, input_ids [T], positions [T], metadata, previous_ids [R])
    #   -> (hidden of last tokens [B, D], hidden [T, D], kv_caches); kv_caches donated;
    #   input ids < 0 are sample links: link_to_sample(i) reads previous_ids[i], the
    #   previous step's sample i
    forward: Callable
    # variant -> (params, hidden [B, D], num_seqs [] int32, SamplingTensors | None)
    #   -> (SamplerOutput, token ids padded to [R]); rows past num_seqs are padding
    sample: dict[str, Callable]
    # (params, hidden [T, D], targets [T]) -> (logprob [T], rank [T], top ids, top logprobs)
    prompt_logprobs: Callable


def make_programs(graphdef: nnx.GraphDef, param_treedef, *, max_num_seqs: int,
                  mesh: jax.sharding.Mesh | None = None) -> Programs:
    def gathered(logits):  # [..., V] sharded over vocab -> replicated on every device
        if mesh is None:
            return logits
        return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, PartitionSpec()))

    def state(leaves):  # list of arrays -> the NNX param state
        return jax.tree.unflatten(param_treedef, leaves)

    def forward(params, kv_caches, input_ids, positions, metadata, previous_ids):
        params = state(params)
        input_ids = resolve_sample_links(input_ids, previous_ids)  # [T]
        hidden, kv_caches = run_model(graphdef, params, kv_caches, input_ids, positions,
                                      metadata)  # [T, D]
        return hidden[metadata.logits_indices], hidden, kv_caches

    def make_sample(variant: str):
        def sample(params, hidden, num_seqs, tensors):  # hidden [B, D], num_seqs []
            params = state(params)
            if variant == "greedy" and mesh is None:  # argmax only: maybe never writes logits
                token_ids = greedy_token_ids(graphdef, params, hidden, num_seqs)  # [B]
                out = sampler.SamplerOutput(token_ids, None, None, None, None)
            elif variant == "greedy_masked" and mesh is None:  # mask, argmax; maybe fused
                token_ids = greedy_token_ids(graphdef, params, hidden, num_seqs,
                                             tensors.token_bitmask)  # [B]
                out = sampler.SamplerOutput(token_ids, None, None, None, None)
            elif variant == "greedy_masked":  # constrained greedy rows: mask, argmax; no sort
                logits = gathered(compute_logits(graphdef, params, hidden, num_seqs))  # [B, V]
                logits = sampler.apply_token_bitmask(logits, tensors.token_bitmask)
                out = sampler.SamplerOutput(sampler.argmax(logits), None, None, None, None)
            else:
                logits = gathered(compute_logits(graphdef, params, hidden, num_seqs))  # [B, V]
                greedy = variant == "greedy"
                out = sampler.sample(logits, tensors, all_greedy=greedy,
                                     with_logprobs=not greedy)
            padded = jnp.zeros((max_num_seqs,), jnp.int32).at[:hidden.shape[0]].set(
                out.token_ids)  # [R]
            if mesh is not None:  # replicated, as the runner's own [R] array is
                padded = jax.lax.with_sharding_constraint(padded,
                                                          NamedSharding(mesh, PartitionSpec()))
            return out, padded
        return jax.jit(sample)

    def prompt_logprobs(params, hidden, targets):  # hidden [T, D], targets [T]
        params = state(params)
        logits = gathered(compute_logits(graphdef, params, hidden))  # [T, V] float32
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        chosen = jax.numpy.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
        ranks = (logprobs > chosen[:, None]).sum(axis=-1) + 1
        top_lps, top_ids = jax.lax.top_k(logprobs, min(sampler.MAX_LOGPROBS, logits.shape[-1]))
        return chosen, ranks, top_ids, top_lps

    return Programs(forward=jax.jit(forward, donate_argnums=(1,)),
                    sample={v: make_sample(v) for v in SAMPLER_VARIANTS},
                    prompt_logprobs=jax.jit(prompt_logprobs))
