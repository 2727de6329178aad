"""Native CPU kernels: C++ XLA FFI handlers, built with the system compiler at first use.

`build` compiles and registers them; the kernels' Python entry points live beside their
Pallas siblings (e.g. `pallas_kernels.ragged_paged_attention.cpu`).
"""
