"""Packed token masks for structured outputs: one bit per vocabulary id, 32 ids per int32.

Bit i of word w allows id 32 * w + i (llguidance's layout, which fills these rows on the
host); a row of all ones (-1) allows everything. The step's `[B, W]` mask goes to the
sampler's masked variants, which unpack it on the device (`sampler.apply_token_bitmask`).
"""

from __future__ import annotations

import numpy as np

from jaxserve.core.scheduler_output import SchedulerOutput


def bitmask_width(vocab_size: int) -> int:
    """W: the int32 words of one row, ceil(V / 32)."""
    return -(-vocab_size // 32)


def pack_token_bitmask(allowed: np.ndarray) -> np.ndarray:  # [B, V] bool -> [B, W] int32
    """Packs boolean rows of allowed ids into words (the inverse of `unpack_token_bitmask`)."""
    num_rows, vocab = allowed.shape
    packed = np.packbits(allowed.astype(bool), axis=-1, bitorder="little")  # [B, ceil(V/8)]
    out = np.zeros((num_rows, 4 * bitmask_width(vocab)), np.uint8)
    out[:, :packed.shape[1]] = packed
    return out.view("<i4").astype(np.int32)


def unpack_token_bitmask(bitmask: np.ndarray,  # [B, W] int32
                         vocab_size: int) -> np.ndarray:  # -> [B, V] bool
    bits = np.unpackbits(np.ascontiguousarray(bitmask, "<i4").view(np.uint8), axis=-1,
                         bitorder="little")  # [B, 32 W]
    return bits[:, :vocab_size].astype(bool)


def step_bitmask(out: SchedulerOutput, req_ids: list[str], num_padded: int,
                 vocab_size: int) -> np.ndarray | None:  # -> [B, W] int32
    """The step's mask in batch order (`req_ids`, padded to `num_padded` rows): the
    engine's rows for the constrained requests, all ones elsewhere; None when no
    request of the step is constrained."""
    if not out.structured_output_req_ids:
        return None
    width = bitmask_width(vocab_size)
    mask = np.full((num_padded, width), -1, np.int32)
    index = {req_id: i for i, req_id in enumerate(req_ids)}
    rows = np.asarray(out.grammar_bitmask, np.int32)  # [G, W'] with W' >= W
    mask[[index[r] for r in out.structured_output_req_ids]] = rows[:, :width]
    return mask
