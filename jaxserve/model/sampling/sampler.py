"""Batched, jittable sampling for every sequence of a step.

In: float32 logits of each sequence's last scheduled token and `SamplingTensors`, one row
per sequence, built on the host by the runner. Out: `SamplerOutput` with the sampled ids and,
when asked for, logprobs of the raw logits. Rows never interact: a row's randomness comes
from its own seed folded with its own output length, so its tokens do not depend on the
batch it happens to share a step with. `all_greedy` is a static fast path (argmax only).
Structured outputs: a packed mask of allowed ids (`token_bitmask`, the masked variants)
sends the logits of every other id to -inf before anything else, logprobs included.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

# Width of the top-logprobs table every step returns when logprobs are requested
# (OpenAI and vLLM both cap `logprobs` at 20).
MAX_LOGPROBS = 20


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["temperature", "top_k", "top_p", "min_p", "presence_penalty",
                                "frequency_penalty", "repetition_penalty", "seeds", "output_lens",
                                "bias_ids", "bias_values", "banned_ids", "history",
                                "prompt_lens", "token_bitmask"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters; padding rows use the neutral value of each field."""

    temperature: jax.Array         # [B] float32; 0 means greedy for that row
    top_k: jax.Array               # [B] int32; V (or more) disables it
    top_p: jax.Array               # [B] float32; 1 disables it
    min_p: jax.Array               # [B] float32; 0 disables it
    presence_penalty: jax.Array    # [B] float32; over output tokens
    frequency_penalty: jax.Array   # [B] float32; over output tokens
    repetition_penalty: jax.Array  # [B] float32; over prompt and output tokens, 1 disables it
    seeds: jax.Array               # [B] uint32; the row's own seed
    output_lens: jax.Array         # [B] int32; tokens generated so far (folded into the key)
    bias_ids: jax.Array            # [B, NB] int32 logit_bias token ids; padding = V (dropped)
    bias_values: jax.Array         # [B, NB] float32 logit_bias values
    banned_ids: jax.Array          # [B, NS] int32 ids masked to -inf (min_tokens); padding = V
    history: jax.Array             # [B, Lh] int32 prompt + output ids for penalties; padding = V
    prompt_lens: jax.Array         # [B] int32; history[:, :prompt_len] is the prompt
    # [B, W] int32, W = ceil(V / 32): bit i of word w allows id 32 w + i (all ones: any id);
    # None in the variants without structured outputs
    token_bitmask: jax.Array | None = None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["token_ids", "logprobs", "ranks", "top_ids", "top_logprobs"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array            # [B] int32 sampled ids
    logprobs: jax.Array | None      # [B] float32 logprob of each sampled id (raw logits)
    ranks: jax.Array | None         # [B] int32 1-based rank of each sampled id
    top_ids: jax.Array | None       # [B, min(MAX_LOGPROBS, V)] int32, best first
    top_logprobs: jax.Array | None  # [B, min(MAX_LOGPROBS, V)] float32


def _scatter_rows(shape, ids, values, *, mode):  # ids, values: [B, X]
    rows = jnp.arange(shape[0])[:, None]
    base = jnp.zeros(shape, values.dtype)
    return base.at[rows, ids].add(values, mode=mode)


def apply_penalties(logits,  # [B, V] float32
                    t: SamplingTensors) -> jax.Array:
    """logit_bias, min_tokens bans, then vLLM's repetition/frequency/presence penalties."""
    num_seqs, vocab = logits.shape
    logits = logits + _scatter_rows(logits.shape, t.bias_ids, t.bias_values, mode="drop")
    banned = _scatter_rows(logits.shape, t.banned_ids, jnp.ones(t.banned_ids.shape), mode="drop")
    logits = jnp.where(banned > 0, -jnp.inf, logits)

    is_output = jnp.arange(t.history.shape[1])[None, :] >= t.prompt_lens[:, None]  # [B, Lh]
    output_counts = _scatter_rows(logits.shape, t.history, is_output.astype(jnp.float32),
                                  mode="drop")  # [B, V]
    seen = _scatter_rows(logits.shape, t.history, jnp.ones(t.history.shape), mode="drop") > 0
    rep = t.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - t.frequency_penalty[:, None] * output_counts
    return logits - t.presence_penalty[:, None] * (output_counts > 0)


def _truncate(logits,  # [B, V] float32, already divided by temperature
              t: SamplingTensors) -> jax.Array:
    """min-p, then top-k and top-p over one descending sort; at least one token survives."""
    probs = jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(probs < t.min_p[:, None] * probs.max(axis=-1, keepdims=True),
                       -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)  # [B, V]
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    sorted_logits = jnp.where(rank < t.top_k[:, None], sorted_logits, -jnp.inf)
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # [B, V]
    keep = (mass_before < t.top_p[:, None]) | (rank == 0)
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, -jnp.inf).at[rows, order].set(sorted_logits)


def apply_token_bitmask(logits,   # [B, V] float32
                        bitmask,  # [B, W] int32
                        ) -> jax.Array:
    """-inf for every id whose bit is clear."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :logits.shape[-1]] > 0  # [B, V]
    return jnp.where(allowed, logits, -jnp.inf)


def argmax(x):  # [B, V] -> [B] int32
    """jnp.argmax over the last axis (first maximal index; a NaN counts as the maximum),
    as two plain reductions: XLA:CPU runs argmax's variadic (value, index) reduce several
    times slower."""
    top = jnp.max(x, axis=-1, keepdims=True)  # [B, 1]; NaN when the row holds one
    hit = (x == top) | jnp.isnan(x)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, ids, x.shape[-1]), axis=-1).astype(jnp.int32)


def _random_sample(logits,  # [B, V] float32 after truncation
                   t: SamplingTensors) -> jax.Array:
    """Exponential race (argmax of p / Exp(1)), keyed by (seed, output length) per row."""
    def row_noise(seed, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.exponential(key, (logits.shape[-1],), jnp.float32)

    noise = jax.vmap(row_noise)(t.seeds, t.output_lens)  # [B, V]
    probs = jax.nn.softmax(logits, axis=-1)
    return argmax(probs / noise)


def sample(logits,  # [B, V] float32 raw logits
           t: SamplingTensors | None, *,
           all_greedy: bool,
           with_logprobs: bool) -> SamplerOutput:
    """Samples one token per row. `all_greedy` skips everything but argmax (t may be None)."""
    if t is not None and t.token_bitmask is not None:
        logits = apply_token_bitmask(logits, t.token_bitmask)
    if all_greedy:
        processed = logits if t is None else apply_penalties(logits, t)
        token_ids = argmax(processed)
    else:
        processed = apply_penalties(logits, t)
        greedy_ids = argmax(processed)
        is_greedy = t.temperature < 1e-5
        temp = jnp.where(is_greedy, 1.0, t.temperature)[:, None]
        random_ids = _random_sample(_truncate(processed / temp, t), t)
        token_ids = jnp.where(is_greedy, greedy_ids, random_ids)
    if not with_logprobs:
        return SamplerOutput(token_ids, None, None, None, None)
    logprobs = jax.nn.log_softmax(logits, axis=-1)  # raw, as vLLM reports by default
    chosen = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(axis=-1).astype(jnp.int32) + 1
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, logits.shape[-1]))
    return SamplerOutput(token_ids, chosen, ranks, top_ids.astype(jnp.int32), top_logprobs)
