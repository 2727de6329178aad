"""Meshes and the logical-axis sharding rules."""
