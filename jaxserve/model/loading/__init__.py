"""Weight loading: checkpoints on disk -> a model's params placed on the devices.

`loader.load_model` reads HF safetensors (`safetensors_reader`, memory-mapped, no torch),
GGUF files (`gguf_file` parses them, `gguf_reader` maps and dequantizes their tensors and
rebuilds the config) and Orbax checkpoints written by `jaxserve convert`
(`orbax_checkpoint`), then adds the layouts the chosen ops read.
"""
