"""Helpers for tests and benchmarks: tiny tokenizers and checkpoints, compilation guards."""

from jaxserve.testing.compilation import CompilationCounter, CompilationError, forbid_compilation

__all__ = ["CompilationCounter", "CompilationError", "forbid_compilation"]
