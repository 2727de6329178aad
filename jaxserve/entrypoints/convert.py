"""`jaxserve convert`: a safetensors or GGUF checkpoint saved as a sharded Orbax checkpoint.

`convert_checkpoint(model, out)` loads the checkpoint (GGUF dequantized) under a TP mesh and
writes what `model/loading/orbax_checkpoint.restore_model` reads: `out/params` (Orbax, each
array with its sharding), `config.json`, a generation config with every EOS id, the
tokenizer and the marker that names the layout.
"""

from __future__ import annotations

import dataclasses
import json
import os

from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.model.loading.orbax_checkpoint import MARKER, PARAMS_DIR
from jaxserve.parallel.sharding import make_mesh
from jaxserve.parallel.tensor_parallel import tp_model_config


def convert_checkpoint(model_path: str, out_dir: str, *, tensor_parallel_size: int = 1,
                       dtype: str = "auto") -> str:
    """Loads `model_path` sharded over `tensor_parallel_size` devices and writes `out_dir`."""
    import orbax.checkpoint as ocp

    from jaxserve.model.loading.loader import load_model
    from jaxserve.tokenization.tokenizer_utils import load_tokenizer

    # float weights: an Orbax checkpoint keeps no quantized form yet (a GGUF dequantizes)
    config = dataclasses.replace(ModelConfig.from_pretrained(model_path, dtype=dtype),
                                 quantization="none")
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
