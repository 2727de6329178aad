"""Helpers for tests and benchmarks: tiny tokenizers and checkpoints, compilation guards."""
