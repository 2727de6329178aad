"""Checkpoint -> model: HF safetensors or a GGUF file, mapped onto the parameters a model declares.

The model is built abstractly (shapes only, no initialiser runs); every `nnx.Param` is then
filled from the tensor its `hf_name` metadata names, transposed when `hf_transpose` says so,
cast to the config dtype and placed with the sharding its logical `axes` give under `mesh`
(the default device when None), one tensor per core at a time. Missing or mis-shaped tensors fail naming the tensor and
both shapes; checkpoint tensors no parameter asks for (a tied lm_head, say) are ignored.
Under a mesh whose "model" axis exceeds the KV heads, K/V tensors are replicated into slots.
A parameter with `hf_stack=E` (MoE experts) stacks E tensors named by its `{expert}` template.
`hf_rows=(start, stop, total)`: the parameter is rows [start, stop) of a fused tensor (Baichuan's
W_pack); `hf_normalize_axis=a`: its vectors along model axis `a` are L2-normalised (NormHead).
Linear kernels load as `QuantizedWeight`s where `model_config.quantization` says so (a GGUF's
stored blocks by default; see quantized_loading.py); so does a GGUF's quantized embedding
table, as stored ([D, V], the tied head's kernel).
A directory `jaxserve convert` wrote is restored by Orbax instead (`orbax_checkpoint`).
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxserve.config import LOAD_FORMATS, ModelConfig
from jaxserve.model.forward import build_model
from jaxserve.model.loading.dummy_weights import dummy_model
from jaxserve.model.loading.gguf_reader import GGUFCheckpointReader, find_gguf_file
from jaxserve.model.ops import Ops
from jaxserve.model.loading.orbax_checkpoint import is_orbax_checkpoint, restore_model
from jaxserve.model.loading.quantized_loading import (place_quantized, quantizable,
                                                      quantizable_head, read_quantized)
from jaxserve.model.loading.safetensors_reader import SafetensorsReader
from jaxserve.model.quantization import QuantizedWeight
from jaxserve.parallel.expert_parallel import sharding_rules
from jaxserve.parallel.sharding import logical_sharding
from jaxserve.parallel.tensor_parallel import MODEL_AXIS, replicate_kv_heads, tp_model_config

logger = logging.getLogger(__name__)

# Checkpoints smaller than this load without a progress bar.
_PROGRESS_MIN_BYTES = 256 * 1024 * 1024


def load_model(model_dir, model_config: ModelConfig, *, mesh: Mesh | None = None,
               ops: Ops = Ops(),
               rules: tuple[tuple[str, str | None], ...] | None = None,
               load_format: str = "auto") -> nnx.Module:
    """The model of `model_config.architecture`, running `ops`, with its weights from
    `model_dir`, and any extra layout its ops read (`prepare_for_ops`).

    `load_format="dummy"`: random weights generated on the devices (`dummy_weights`); no
    file but the config is read.

    `rules` None: the sharding rules `model_config.enable_expert_parallel` selects.
    Split it once (`graphdef, params = nnx.split(model)`); the runner's programs step it.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if rules is None:
        rules = sharding_rules(expert_parallel=model_config.enable_expert_parallel)
    if load_format == "dummy":
        return prepare_for_ops(dummy_model(model_config, mesh=mesh, ops=ops, rules=rules), ops)
    if is_orbax_checkpoint(model_dir):
        return prepare_for_ops(restore_model(model_dir, model_config, mesh=mesh, ops=ops,
                                             rules=rules), ops)
    tp = 1 if mesh is None else mesh.shape.get(MODEL_AXIS, 1)
    built_config = tp_model_config(model_config, tp)
    kv_factor = built_config.num_kv_heads // model_config.num_kv_heads
    abstract = build_model(built_config, ops=ops, abstract=True)
    graphdef, state = nnx.split(abstract)
    gguf_file = find_gguf_file(model_dir)
    reader = SafetensorsReader(model_dir) if gguf_file is None else GGUFCheckpointReader(gguf_file)
    dtype = np.dtype(jnp.dtype(model_config.dtype))
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    num_params = len(jax.tree.leaves(state, is_leaf=is_variable))
    with tqdm(total=num_params, desc="Loading weights", unit="tensor",
              disable=reader.total_bytes() < _PROGRESS_MIN_BYTES) as bar:

        def load(variable: nnx.Variable) -> nnx.Variable:
            value = _load_tensor(reader, variable, dtype, mesh, rules,
                                 kv_factor=kv_factor, head_dim=model_config.head_dim,
                                 quantization=model_config.quantization)
            bar.update()
            return variable.replace(value)

        # Dequantizing, transposing and casting run in numpy, which lets go of the GIL:
        # one tensor per core at a time. Across processes, one at a time: a device_put onto
        # a multi-host mesh is a collective, which every process must issue in one order.
        variables, treedef = jax.tree.flatten(state, is_leaf=is_variable)
        workers = (os.cpu_count() or 1) if jax.process_count() == 1 else 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            state = jax.tree.unflatten(treedef, list(pool.map(load, variables)))
    _log_quantized(state, model_config.quantization)
    return prepare_for_ops(nnx.merge(graphdef, state), ops)


def prepare_for_ops(model: nnx.Module, ops: Ops) -> nnx.Module:
    """Adds the weight layouts `ops` reads beside the checkpoint's: for the native greedy
    head of a tied model, a contiguous [D, V] transpose of the embedding (V * D more
    elements, streamed as it is instead of transposed per step)."""
    if (ops.native_dense and getattr(model, "lm_head", False) is None
            and not model.embed_tokens.quantized):
        model.embed_tokens.add_kn_head()
    return model


def _log_quantized(state, quantization: str | None) -> None:
    """One line saying which weights loaded quantized, in which forms."""
    values = [v[...] for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))]
    kinds = sorted({f"int{v.bits} g{v.group_size}" for v in values
                    if isinstance(v, QuantizedWeight)})
    count = sum(isinstance(v, QuantizedWeight) for v in values)
    if count or quantization not in (None, "none"):
        logger.info("quantization %s: %d weights quantized (%s), the rest float",
                    quantization or "as stored", count, ", ".join(kinds) or "none")


def _load_tensor(reader: SafetensorsReader | GGUFCheckpointReader, variable: nnx.Variable,
                 dtype: np.dtype, mesh: Mesh | None, rules, *, kv_factor: int = 1,
                 head_dim: int = 0, quantization: str | None = None
                 ) -> jax.Array | QuantizedWeight:
    """One parameter: read, check the shape, transpose, cast, replicate KV heads, place."""
    meta = variable.get_metadata()
    name, transpose, axes = meta.get("hf_name"), meta.get("hf_transpose", False), meta.get("axes")
    if name is None or axes is None:
        raise ValueError(f"a {type(variable).__name__} of shape {variable.shape} declares no "
                         "hf_name/axes; build parameters with layers.hf_param")
    if meta.get("hf_stack") is not None:
        return _load_stacked(reader, variable, dtype, mesh, rules)
    model_shape = list(variable.shape)
    kv_axis = axes.index("kv_heads") if "kv_heads" in axes else None
    if kv_axis is not None:
        model_shape[kv_axis] //= kv_factor  # the checkpoint holds K heads, the model K' slots
    expected = tuple(reversed(model_shape)) if transpose else tuple(model_shape)
    if quantizable(meta) or (quantizable_head(meta) and quantization is None):
        weight = read_quantized(reader, name, expected, quantization, np.dtype(dtype).name)
        if weight is not None:  # [K, N]: a head's [V, D] table is read as [D, V]
            return place_quantized(weight, axes if transpose else axes[::-1], mesh, rules,
                                   head_dim=head_dim,
                                   kv_factor=kv_factor if kv_axis is not None else 1)
    if meta.get("hf_rows") is None:
        tensor = _read_checked(reader, name, expected)
    else:  # rows [start, stop) of a fused [total, ...] checkpoint tensor
        start, stop, total = meta["hf_rows"]
        tensor = _read_checked(reader, name, (total, *expected[1:]))[start:stop]
    view = tensor.T if transpose else tensor  # still the memory-mapped bytes
    if kv_axis is not None and kv_factor > 1:
        host = replicate_kv_heads(np.array(view, dtype=dtype, order="C"), kv_axis, kv_factor,
                                  head_dim)
        return jax.device_put(host, logical_sharding(axes, host.shape, mesh, rules=rules))
    # Each device reads (and casts) only its own shard of the mapped file: the host never
    # holds a sharded tensor whole.
    sharding = logical_sharding(axes, view.shape, mesh, rules=rules)
    norm_axis = meta.get("hf_normalize_axis")
    if norm_axis is None:
        return jax.make_array_from_callback(
            view.shape, sharding, lambda index: np.array(view[index], dtype=dtype, order="C"))

    def normalized(index):  # the shard's vectors whole along `norm_axis`, then its slice
        whole = tuple(slice(None) if a == norm_axis else i for a, i in enumerate(index))
        block = np.asarray(view[whole], np.float32)
        block = block / np.maximum(np.linalg.norm(block, axis=norm_axis, keepdims=True), 1e-12)
        part = tuple(i if a == norm_axis else slice(None) for a, i in enumerate(index))
        return np.array(block[part], dtype=dtype, order="C")

    return jax.make_array_from_callback(view.shape, sharding, normalized)


def _read_checked(reader, name: str, expected: tuple[int, ...]):
    """The checkpoint tensor `name`; ValueError naming it when missing or mis-shaped."""
    if name not in reader:
        raise ValueError(f"checkpoint {reader.model_dir} has no tensor {name!r} "
                         f"(the model expects shape {expected})")
    tensor = reader.get(name)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                         f"the model expects {expected}")
    return tensor


def _load_stacked(reader, variable: nnx.Variable, dtype: np.dtype, mesh: Mesh | None,
                  rules) -> jax.Array:
    """An [E, ...] parameter from E checkpoint tensors named by its `{expert}` template."""
    meta = variable.get_metadata()
    slice_shape = tuple(variable.shape[1:])
    expected = tuple(reversed(slice_shape)) if meta.get("hf_transpose") else slice_shape
    parts = []
    for expert in range(meta["hf_stack"]):
        tensor = _read_checked(reader, meta["hf_name"].format(expert=expert), expected)
        parts.append(np.asarray(tensor.T if meta.get("hf_transpose") else tensor, dtype=dtype))
    host = np.stack(parts)  # [E, ...]
    return jax.device_put(host, logical_sharding(meta["axes"], host.shape, mesh, rules=rules))
