"""Flax NNX models, functional at the jit boundary: metadata, ops, layers, attention, the
families; weight loading (`loading/`) and sampling (`sampling/`) in their own packages."""
