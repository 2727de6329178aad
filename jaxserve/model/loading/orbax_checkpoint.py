"""Orbax checkpoints: loaded params (GGUF dequantized too) saved sharded, restored onto a mesh.

`convert_checkpoint(model, out)` loads a safetensors or GGUF checkpoint under a TP mesh and
writes `out/params` (Orbax, each array with its sharding), `config.json`, a generation config
with every EOS id, the tokenizer and a `jaxserve_orbax.json` marker. `restore_model` builds
the model abstractly and restores each parameter straight into its `NamedSharding`.
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
from jaxserve.parallel.sharding import DEFAULT_RULES, logical_sharding, make_mesh
from jaxserve.parallel.tensor_parallel import MODEL_AXIS, tp_model_config

MARKER = "jaxserve_orbax.json"
PARAMS_DIR = "params"


def is_orbax_checkpoint(path) -> bool:
    """Whether `path` is a directory `convert_checkpoint` wrote."""
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def convert_checkpoint(model_path: str, out_dir: str, *, tensor_parallel_size: int = 1,
                       dtype: str = "auto") -> str:
    """Loads `model_path` sharded over `tensor_parallel_size` devices and writes `out_dir`."""
    import orbax.checkpoint as ocp

    from jaxserve.model.loading.loader import load_model
    from jaxserve.tokenization.tokenizer_utils import load_tokenizer

    config = ModelConfig.from_pretrained(model_path, dtype=dtype)
    tp = tensor_parallel_size
    mesh = make_mesh(tp) if tp > 1 else None
    model = load_model(config.model_dir, config, mesh=mesh)
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out_dir, PARAMS_DIR), nnx.to_pure_dict(nnx.state(model)))
    checkpointer.wait_until_finished()
    config.hf_config.save_pretrained(out_dir)  # config.json (GGUF: built from its metadata)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": list(config.eos_token_ids),
                   "bos_token_id": config.bos_token_id}, f)
    try:
        load_tokenizer(model_path).save_pretrained(out_dir)
    except ValueError:  # a checkpoint without a tokenizer serves token ids only
        pass
    kv_slots = tp_model_config(config, tp).num_kv_heads
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump({"tensor_parallel_size": tp, "kv_head_slots": kv_slots,
                   "dtype": config.dtype, "source": os.path.abspath(model_path)}, f, indent=1)
    return out_dir


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
