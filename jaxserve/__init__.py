"""jaxserve: an LLM serving engine on JAX/XLA.

The public names are loaded lazily so that importing a pure-Python subpackage
(`jaxserve.core`) never pulls in jax.
"""

import importlib

_EXPORTS: dict[str, str] = {
    "LLM": "jaxserve.entrypoints.llm",
    "EngineArgs": "jaxserve.engine.engine_args",
    "SamplingParams": "jaxserve.sampling_params",
    "StructuredOutputsParams": "jaxserve.sampling_params",
    "EngineConfig": "jaxserve.config",
    "RequestOutput": "jaxserve.outputs",
    "CompletionOutput": "jaxserve.outputs",
}

__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
