"""Sample links: how a step's input ids name tokens the step before it is still sampling.

With async scheduling (docs/architecture.md, "Async scheduling: one step ahead") the runner
prepares step N+1 while step N computes, so the token N samples for a request it decodes
in N+1 is not on the host yet. N+1's input id for that token is a *sample link*,
`link_to_sample(i)` = -1 - i: "the token step N samples for its sequence i" (i: the
request's index in N's batch, `PendingStep.sample_indices()`). Links are negative and
vocabulary ids never are, so the one int32 `input_ids` array carries both. The token never
visits the host: N's sampler returns its ids padded to [R] (`PendingStep.next_ids`), N+1's
`forward` takes that array as `previous_ids` and `resolve_sample_links` swaps each link for
the id it names, on the device.
"""

from __future__ import annotations

import jax.numpy as jnp


def link_to_sample(index):
    """The input id that names sample `index` of the step in flight: -1 - index (an int or
    an int32 array of them, elementwise)."""
    return -1 - index


def linked_sample(input_ids):
    """The sample index each link names (the inverse of `link_to_sample`); meaningless for
    ids that are no links."""
    return -1 - input_ids


def is_sample_link(input_ids):
    """Which input ids are sample links (the negative ones)."""
    return input_ids < 0


def resolve_sample_links(input_ids,      # [T] int32, links included
                         previous_ids):  # [R] int32 the step in flight's samples, padded
    """[T] int32: each link replaced by the sample it names, other ids as they are.
    Traced inside `forward`; with no step in flight `previous_ids` is zeros, never used."""
    linked = jnp.take(previous_ids, linked_sample(input_ids), mode="clip")  # [T]
    return jnp.where(is_sample_link(input_ids), linked, input_ids)  # [T]
