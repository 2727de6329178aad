"""Checkpoint -> model: HF safetensors or a GGUF file, mapped onto the parameters a model declares.

The model is built abstractly (shapes only, no initialiser runs); every `nnx.Param` is then
filled from the tensor its `hf_name` metadata names, transposed when `hf_transpose` says so,
cast to the config dtype and placed with the sharding its logical `axes` give under `mesh`
(the default device when None). Missing or mis-shaped tensors fail naming the tensor and
both shapes; checkpoint tensors no parameter asks for (a tied lm_head, say) are ignored.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxserve.config import ModelConfig
from jaxserve.model.forward import build_model
from jaxserve.model.gguf_reader import GGUFCheckpointReader, find_gguf_file
from jaxserve.model.safetensors_reader import SafetensorsReader
from jaxserve.parallel.sharding import DEFAULT_RULES, logical_sharding

# Checkpoints smaller than this load without a progress bar.
_PROGRESS_MIN_BYTES = 256 * 1024 * 1024


def load_model(model_dir, model_config: ModelConfig, *, mesh: Mesh | None = None,
               attention_backend: str = "reference",
               rules: tuple[tuple[str, str | None], ...] = DEFAULT_RULES) -> nnx.Module:
    """The model of `model_config.architecture` with its weights from `model_dir`.

    Split it once (`graphdef, params = nnx.split(model)`) and step it with `make_forward`.
    """
    abstract = build_model(model_config, attention_backend=attention_backend, abstract=True)
    graphdef, state = nnx.split(abstract)
    gguf_file = find_gguf_file(model_dir)
    reader = SafetensorsReader(model_dir) if gguf_file is None else GGUFCheckpointReader(gguf_file)
    dtype = np.dtype(jnp.dtype(model_config.dtype))
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    num_params = len(jax.tree.leaves(state, is_leaf=is_variable))
    with tqdm(total=num_params, desc="Loading weights", unit="tensor",
              disable=reader.total_bytes() < _PROGRESS_MIN_BYTES) as bar:

        def load(variable: nnx.Variable) -> nnx.Variable:
            value = _load_tensor(reader, variable, dtype, mesh, rules)
            bar.update()
            return variable.replace(value)

        state = jax.tree.map(load, state, is_leaf=is_variable)
    return nnx.merge(graphdef, state)


def _load_tensor(reader: SafetensorsReader | GGUFCheckpointReader, variable: nnx.Variable,
                 dtype: np.dtype, mesh: Mesh | None, rules) -> jax.Array:
    """One parameter: read, check the shape, transpose, cast, place."""
    meta = variable.get_metadata()
    name, transpose, axes = meta.get("hf_name"), meta.get("hf_transpose", False), meta.get("axes")
    if name is None or axes is None:
        raise ValueError(f"a {type(variable).__name__} of shape {variable.shape} declares no "
                         "hf_name/axes; build parameters with layers.hf_param")
    expected = tuple(reversed(variable.shape)) if transpose else tuple(variable.shape)
    if name not in reader:
        raise ValueError(f"checkpoint {reader.model_dir} has no tensor {name!r} "
                         f"(the model expects shape {expected})")
    tensor = reader.get(name)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                         f"the model expects {expected}")
    host = np.array(tensor.T if transpose else tensor, dtype=dtype, order="C")  # one copy
    return jax.device_put(host, logical_sharding(axes, host.shape, mesh, rules=rules))
