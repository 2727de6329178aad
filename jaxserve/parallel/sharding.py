"""Logical axis names -> mesh axes: the one table that says how arrays are sharded.

Model code names each parameter's axes logically ("vocab", "embed", "q_heads", "mlp", ...);
`logical_sharding` turns those names into a `NamedSharding` over a `("data", "model")` mesh
with the rules below. A dimension that the mesh axis does not divide stays replicated, and
with no mesh every array goes to the default device (`no_sharding()`).
"""

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis (None: replicated). Heads, KV heads, MLP width and vocab
# shard over "model" (tensor parallelism); the residual stream stays whole.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "model"),
    ("embed", None),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("experts", None),  # MoE stacks split on F ("mlp"); expert_parallel.py's rules split E
    ("norm", None),
    ("blocks", None),
    ("block_size", None),
)


def make_mesh(tp: int = 1, dp: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("data", "model")` mesh of `dp x tp` devices (the first `dp * tp` by default)."""
    if tp < 1 or dp < 1:
        raise ValueError(f"make_mesh: tp and dp must be >= 1, got tp={tp}, dp={dp}")
    devices = list(jax.devices() if devices is None else devices)
    if dp * tp > len(devices):
        raise ValueError(f"make_mesh: tp * dp = {tp * dp} devices needed, {len(devices)} available")
    return jax.make_mesh((dp, tp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:dp * tp])


def no_sharding() -> jax.sharding.Sharding:
    """Everything on the default device: the placement when no mesh is given."""
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def logical_to_spec(axes: Sequence[str | None],
                    shape: Sequence[int],
                    mesh: Mesh,
                    *,
                    rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of an array whose dims carry the logical names `axes`.

    A dim stays replicated when its rule maps to None, when its mesh axis is already used by
    an earlier dim, or when the mesh axis size does not divide it (e.g. 2 KV heads on TP=4).
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name is not None and name not in table:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(table)}")
        mesh_axis = None if name is None else table[name]
        if (mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape
                or size % mesh.shape[mesh_axis] != 0):
            spec.append(None)
            continue
        used.add(mesh_axis)
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def logical_sharding(axes: Sequence[str | None],
                     shape: Sequence[int],
                     mesh: Mesh | None = None,
                     *,
                     rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES
                     ) -> jax.sharding.Sharding:
    """The sharding for an array with logical `axes` under `mesh` (`no_sharding()` if None)."""
    if mesh is None:
        return no_sharding()
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules=rules))


def kv_pool_sharding(shape: Sequence[int],  # [K, L, S, H] one layer's key (or value) pool
                     mesh: Mesh | None = None) -> jax.sharding.Sharding:
    """The pool shards over KV heads, like the k/v projections that fill it."""
    return logical_sharding(("kv_heads", "blocks", "block_size", "head_dim"), shape, mesh)
