"""Per-row sampling parameters kept across steps, gathered into `SamplingTensors`.

A request's parameters are written into its row once, when it joins the batch; each step
gathers the scheduled rows (vectorized) and picks the cheapest sampler variant that serves
them all: `greedy` (argmax only), `greedy_masked` (argmax under the packed token mask of
structured outputs, see token_bitmask.py: the mask is its only tensor), `sample`
(temperature, top-k/p, min-p, bias, min_tokens, logprobs), `masked` (`sample` plus the
mask) or `penalties` (`sample` plus the token history the penalties need, and
the mask, all ones when no row is constrained: the history costs far more). `penalties`
serves any rows with the tokens their own variant gives, so a step whose variant is not
compiled yet (a cold start compiles EARLY_VARIANTS first) runs it instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container

import numpy as np

from jaxserve.model.sampling.sampler import SamplingTensors
from jaxserve.runner.token_bitmask import bitmask_width
from jaxserve.sampling_params import SamplingParams

# Static widths of the sparse per-row tables (compiled shapes). The engine rejects requests
# that need more with a ValueError naming the parameter.
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_MIN_TOKENS_BANNED_IDS = 64

# greedy_masked: greedy rows, some constrained (structured outputs): mask, then argmax only
SAMPLER_VARIANTS = ("greedy", "greedy_masked", "sample", "masked", "penalties")
# What the first compilation stage holds (a cold start compiles only these before serving):
# argmax, and `penalties`, which serves every row (neutral penalties, an all-ones mask).
EARLY_VARIANTS = ("greedy", "penalties")


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingSetup:
    """What a request's sampling row is built from (`SamplingRows.set_row`). The batch keeps
    one per live request from admission to finish, through preemption, so that a resumed
    request samples with the seed it had."""

    params: SamplingParams
    eos_token_ids: tuple[int, ...]  # banned (with the stop ids) until min_tokens are out
    prompt_len: int  # P: the row's tokens past it are outputs
    seed: int  # the request's own, or one the batch drew for it


class SamplingRows:
    def __init__(self, num_rows: int, *, vocab_size: int, max_model_len: int):
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.temperature = np.zeros(num_rows, np.float32)
        self.top_k = np.full(num_rows, vocab_size, np.int32)
        self.top_p = np.ones(num_rows, np.float32)
        self.min_p = np.zeros(num_rows, np.float32)
        self.presence = np.zeros(num_rows, np.float32)
        self.frequency = np.zeros(num_rows, np.float32)
        self.repetition = np.ones(num_rows, np.float32)
        self.seeds = np.zeros(num_rows, np.uint32)
        self.prompt_lens = np.zeros(num_rows, np.int32)
        self.min_tokens = np.zeros(num_rows, np.int32)
        self.logprobs = np.zeros(num_rows, bool)
        self.bias_ids = np.full((num_rows, MAX_LOGIT_BIAS_ENTRIES), vocab_size, np.int32)
        self.bias_values = np.zeros((num_rows, MAX_LOGIT_BIAS_ENTRIES), np.float32)
        self.banned_ids = np.full((num_rows, MAX_MIN_TOKENS_BANNED_IDS), vocab_size, np.int32)
        self.has_bias = np.zeros(num_rows, bool)
        self.has_penalty = np.zeros(num_rows, bool)

    def set_row(self, row: int, setup: SamplingSetup) -> None:
        params = setup.params
        self.temperature[row] = params.temperature
        top_k = params.top_k if params.top_k > 0 else self.vocab_size
        self.top_k[row] = min(top_k, self.vocab_size)
        self.top_p[row], self.min_p[row] = params.top_p, params.min_p
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.repetition[row] = params.repetition_penalty
        self.has_penalty[row] = params.has_penalties
        self.seeds[row] = setup.seed % 2**32
        self.prompt_lens[row] = setup.prompt_len
        self.min_tokens[row] = params.min_tokens
        self.logprobs[row] = params.logprobs is not None
        bias = params.logit_bias or {}
        self.bias_ids[row] = self.vocab_size
        self.bias_values[row] = 0
        self.bias_ids[row, :len(bias)] = list(bias)
        self.bias_values[row, :len(bias)] = list(bias.values())
        self.has_bias[row] = bool(bias)
        # Ids past the vocabulary can never be sampled: nothing to ban.
        banned = sorted(i for i in set(setup.eos_token_ids) | params.all_stop_token_ids
                        if i < self.vocab_size) if params.min_tokens else []
        self.banned_ids[row] = self.vocab_size
        self.banned_ids[row, :len(banned)] = banned

    def gather(self, rows: np.ndarray,        # [B_real] rows of the scheduled requests
               num_tokens: np.ndarray,        # [B_real] ids known per row (history length)
               token_ids: np.ndarray,         # [R, max_model_len] the batch's token rows
               padded: int,
               bitmask: np.ndarray | None = None,  # [padded, W] int32 structured outputs
               runnable: Container[str] = SAMPLER_VARIANTS,
               ) -> tuple[str, SamplingTensors | None]:
        """(variant, tensors) for the scheduled rows, padded to `padded` rows; `bitmask`
        (None: no row is constrained) picks a masked variant. The cheapest variant that
        serves the rows, or `penalties` (same tokens) if that one is not in `runnable` (the
        variants compiled so far: EARLY_VARIANTS at least)."""
        output_lens = num_tokens - self.prompt_lens[rows]
        banning = output_lens < self.min_tokens[rows]
        greedy = (np.all(self.temperature[rows] < 1e-5) and not self.has_bias[rows].any()
                  and not banning.any() and not self.has_penalty[rows].any()
                  and not self.logprobs[rows].any())
        if greedy and bitmask is None and "greedy" in runnable:
            return "greedy", None
        if greedy and bitmask is not None and "greedy_masked" in runnable:
            return "greedy_masked", mask_only(bitmask)  # one array to transfer, not fifteen
        variant = ("penalties" if self.has_penalty[rows].any()
                   else "sample" if bitmask is None else "masked")
        if greedy or variant not in runnable:
            variant = "penalties"
        if variant == "penalties" and bitmask is None:
            bitmask = np.full((padded, bitmask_width(self.vocab_size)), -1, np.int32)
        num_real, vocab = len(rows), self.vocab_size

        def pad(values, fill, dtype):
            out = np.full((padded,) + values.shape[1:], fill, dtype)
            out[:num_real] = values
            return out

        banned = np.where(banning[:, None], self.banned_ids[rows], vocab)
        if variant == "penalties":
            width = self.max_model_len
            history = np.where(np.arange(width)[None, :] < num_tokens[:, None],
                               token_ids[rows], vocab)
        else:
            history = np.full((num_real, 1), vocab, np.int32)
        tensors = SamplingTensors(
            temperature=pad(self.temperature[rows], 0, np.float32),
            top_k=pad(self.top_k[rows], vocab, np.int32),
            top_p=pad(self.top_p[rows], 1, np.float32),
            min_p=pad(self.min_p[rows], 0, np.float32),
            presence_penalty=pad(self.presence[rows], 0, np.float32),
            frequency_penalty=pad(self.frequency[rows], 0, np.float32),
            repetition_penalty=pad(self.repetition[rows], 1, np.float32),
            seeds=pad(self.seeds[rows], 0, np.uint32),
            output_lens=pad(output_lens, 0, np.int32),
            bias_ids=pad(self.bias_ids[rows], vocab, np.int32),
            bias_values=pad(self.bias_values[rows], 0, np.float32),
            banned_ids=pad(banned, vocab, np.int32),
            history=pad(history, vocab, np.int32),
            prompt_lens=pad(self.prompt_lens[rows], 0, np.int32),
            token_bitmask=None if variant == "sample" else bitmask)
        return variant, tensors


def mask_only(bitmask: np.ndarray) -> SamplingTensors:  # [B, W] int32
    """The tensors of `greedy_masked`: the token mask, every other field None."""
    fields = {f.name: None for f in dataclasses.fields(SamplingTensors)}
    return SamplingTensors(**{**fields, "token_bitmask": bitmask})


def dummy_tensors(variant: str, num_rows: int, *, vocab_size: int,
                  max_model_len: int) -> SamplingTensors | None:
    """Neutral tensors of a variant's shapes, for warm-up compilation."""
    if variant == "greedy":
        return None
    rows = SamplingRows(num_rows, vocab_size=vocab_size, max_model_len=max_model_len)
    token_ids = np.zeros((num_rows, max_model_len), np.int32)
    if variant == "penalties":
        rows.has_penalty[:] = True
    if variant != "greedy_masked":
        rows.temperature[:] = 1.0
    bitmask = (np.full((num_rows, bitmask_width(vocab_size)), -1, np.int32)
               if variant in ("masked", "greedy_masked") else None)
    chosen, tensors = rows.gather(np.arange(num_rows), np.ones(num_rows, np.int32), token_ids,
                                  num_rows, bitmask)
    assert chosen == variant, (chosen, variant)
    return tensors
