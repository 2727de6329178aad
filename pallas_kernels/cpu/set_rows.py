"""Row writes into a paged pool in place on CPU (set_rows.cc): slot t of `[..., L, S, W]`.

XLA:CPU rewrites a bfloat16 scatter as a float32 round trip of the whole pool; this FFI
handler aliases the pool to its result and copies only the new rows. `available()` says
whether it builds here.
"""

import jax

from pallas_kernels.cpu import build

_TARGETS = ("set_rows_cpu",)


def available(march: str | None = None) -> bool:
    """Whether set_rows.cc builds and registers with XLA here for `march` (see
    `build.resolve_march`)."""
    return build.available("set_rows", _TARGETS, march)


def set_rows(pool,   # [..., L, S, W] (L blocks of S slots of W values)
             slots,  # [T] int32 slot (block * S + offset) of each new row, in [0, L*S)
             rows,   # [T, ..., W] in the pool's dtype (token-major)
             *, march: str | None = None) -> jax.Array:  # [..., L, S, W]
    """The pool with rows[t, ..., :] at slot slots[t]; in place when the pool is donated.

    The pool keeps its block axes (a reshaped operand would make XLA copy the whole pool
    around the aliased call). A slot outside [0, L*S) fails the call (an XLA runtime
    error); repeated slots keep the last row.
    """
    if (rows.ndim + 1 != pool.ndim or rows.shape[1:-1] != pool.shape[:-3]
            or rows.shape[-1] != pool.shape[-1]):
        raise ValueError(f"rows shape {rows.shape} does not fit pool shape {pool.shape} "
                         "([T, ..., W] vs [..., L, S, W])")
    if rows.dtype != pool.dtype:
        raise ValueError(f"rows dtype {rows.dtype} != pool dtype {pool.dtype}")
    if slots.shape != (rows.shape[0],):
        raise ValueError(f"slots shape {slots.shape} != ({rows.shape[0]},) (one per row)")
    call = jax.ffi.ffi_call(build.ffi_target("set_rows", _TARGETS, "set_rows_cpu", march),
                            jax.ShapeDtypeStruct(pool.shape, pool.dtype),
                            input_output_aliases={0: 0})
    return call(pool, slots.astype("int32"), rows)
