"""Orbax checkpoints: params saved sharded (`entrypoints/convert.py` writes them), restored
onto a mesh.

A converted directory holds `params/` (Orbax, each array with its sharding), `config.json`,
a generation config with every EOS id, the tokenizer and a `jaxserve_orbax.json` marker.
`restore_model` builds the model abstractly and restores each parameter straight into its
`NamedSharding`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.forward import build_model
from jaxserve.model.ops import Ops
from jaxserve.parallel.sharding import DEFAULT_RULES, logical_sharding
from jaxserve.parallel.tensor_parallel import MODEL_AXIS, tp_model_config

MARKER = "jaxserve_orbax.json"
PARAMS_DIR = "params"


def is_orbax_checkpoint(path) -> bool:
    """Whether `path` is a directory `entrypoints.convert.convert_checkpoint` wrote."""
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def restore_model(model_dir, model_config: ModelConfig, *, mesh=None,
                  ops: Ops = Ops(),
                  rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES) -> nnx.Module:
    """The model of an Orbax checkpoint, each param restored with its sharding under `mesh`."""
    import orbax.checkpoint as ocp

    with open(os.path.join(os.fspath(model_dir), MARKER)) as f:
        marker = json.load(f)
    tp = 1 if mesh is None else mesh.shape.get(MODEL_AXIS, 1)
    built_config = tp_model_config(model_config, tp)
    if built_config.num_kv_heads != marker["kv_head_slots"]:
        raise ValueError(
            f"{model_dir} holds {marker['kv_head_slots']} KV head slots (converted with "
            f"--tensor-parallel-size {marker['tensor_parallel_size']}); tensor_parallel_size "
            f"{tp} needs {built_config.num_kv_heads}: convert again with that size")
    abstract = build_model(built_config, ops=ops, abstract=True)
    graphdef, state = nnx.split(abstract)
    dtype = jnp.dtype(model_config.dtype)

    def target(variable: nnx.Variable) -> nnx.Variable:  # shape, dtype, sharding; no data
        sharding = logical_sharding(variable.get_metadata()["axes"], variable.shape, mesh,
                                    rules=rules)
        return variable.replace(jax.ShapeDtypeStruct(variable.shape, dtype, sharding=sharding))

    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    targets = nnx.to_pure_dict(jax.tree.map(target, state, is_leaf=is_variable))
    restored = ocp.StandardCheckpointer().restore(
        os.path.join(os.path.abspath(os.fspath(model_dir)), PARAMS_DIR), targets)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
