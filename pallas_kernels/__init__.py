"""Standalone attention kernels for jaxserve: imports jax only, never jaxserve."""
