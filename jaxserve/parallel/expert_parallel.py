"""MoE expert stacks over the "model" mesh axis: which rules shard them, and the shard_map.

Default TP keeps every expert on every rank with its MLP width F split (like a dense MLP);
expert parallelism (`enable_expert_parallel`) gives each rank E / TP whole experts instead.
Either way `shard_experts` runs the grouped matmuls under `jax.shard_map` over "model": a
rank computes only the experts (or the F slice) it holds, for the token copies routed to
them, and the partial [T, D] outputs are summed with one psum, so nothing is all-gathered.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from jaxserve.parallel.sharding import DEFAULT_RULES, logical_to_spec
from jaxserve.parallel.tensor_parallel import MODEL_AXIS

Rules = tuple[tuple[str, str | None], ...]

# Expert parallelism: the "experts" axis takes the model axis; an expert stack's "mlp" axis
# then stays whole (a mesh axis shards one dim at most), while dense MLPs keep their TP split.
EXPERT_PARALLEL_RULES: Rules = tuple((name, MODEL_AXIS if name == "experts" else axis)
                                     for name, axis in DEFAULT_RULES)


def sharding_rules(*, expert_parallel: bool = False) -> Rules:
    """The logical-axis rules params are placed with: DEFAULT_RULES, or EP's."""
    return EXPERT_PARALLEL_RULES if expert_parallel else DEFAULT_RULES


# (w_gate, w_up, w_down) logical axes; SparseMoE declares its stacks with these.
UP_AXES = ("experts", "embed", "mlp")  # [E, D, F]
DOWN_AXES = ("experts", "mlp", "embed")  # [E, F, D]


def shard_experts(fn: Callable, x, weights, experts, w_gate, w_up, w_down, *,
                  expert_parallel: bool) -> jax.Array:
    """`fn(x, weights, experts, w_gate, w_up, w_down, first_expert) -> [T, D] float32` per
    rank under shard_map over "model", summed over ranks; x [T, D], weights/experts [T, k]
    replicated; the stacks with the specs their logical axes give under the rules
    (`expert_parallel`), so the specs always match how the loader placed them.
    `first_expert` is the global id of the rank's first local expert (0 unless E is split).
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = sharding_rules(expert_parallel=expert_parallel)
    up_spec = logical_to_spec(UP_AXES, w_gate.shape, mesh, rules=rules)
    down_spec = logical_to_spec(DOWN_AXES, w_down.shape, mesh, rules=rules)
    experts_split = up_spec[0] == MODEL_AXIS
    reduce = MODEL_AXIS in tuple(up_spec)  # split on E or on F: each rank has a partial sum
    num_local = w_gate.shape[0] // (mesh.shape[MODEL_AXIS] if experts_split else 1)

    def local(x, weights, experts, w_gate, w_up, w_down):
        first = jax.lax.axis_index(MODEL_AXIS) * num_local if experts_split else 0
        out = fn(x, weights, experts, w_gate, w_up, w_down, first)  # [T, D] float32
        return jax.lax.psum(out, MODEL_AXIS) if reduce else out

    return jax.shard_map(local, in_specs=(P(), P(), P(), up_spec, up_spec, down_spec),
                         out_specs=P(), check_vma=False)(x, weights, experts, w_gate, w_up,
                                                         w_down)
