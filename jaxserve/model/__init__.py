"""Flax NNX models, functional at the jit boundary: metadata, layers, attention, loader."""
