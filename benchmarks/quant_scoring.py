"""Teacher-forced scoring for benchmark_quantization.py, through an engine's own programs.

`final_hidden(llm, sequences, rows)` packs whole sequences into steps of the engine's
compiled forward (its buckets, params, kernels and KV pool dtype: nothing new compiles) and
keeps the final hidden states [n, D] of the positions each sequence asks for. `LMHead` turns
such rows into float32 logits in fixed-size chunks (one compilation) and reduces them on the
device: `compare` gives a reference's and a variant's per-row logit differences, argmaxes
and the reference's top-1 margin, `log_probs` the log-probability of each row's next token;
`agreement` compares free-running outputs. The engine must not generate again after
`final_hidden`: its KV pool is reused as scratch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

CHUNK_ROWS = 256  # hidden rows per LM-head call: [256, V] float32 logits at a time


def final_hidden(llm, sequences: list[list[int]],
                 rows: list[np.ndarray]) -> list[np.ndarray]:
    """The final hidden states [len(rows[i]), D] of each sequence at its positions
    `rows[i]`, each sequence computed whole in one step (causal: its logits do not depend on
    the other sequences of the step)."""
    from jaxserve.model.attention_metadata import AttentionMetadata

    runner = llm.llm_engine.runner
    size = runner.kv_spec.block_size
    max_tokens, max_seqs = runner.token_buckets[-1], runner.seq_buckets[-1]
    free_blocks = runner.num_blocks - 1  # block 0 is the null block
    no_previous = jax.device_put(np.zeros(max_seqs, np.int32), jax.devices()[0])  # [R]
    out: list[np.ndarray | None] = [None] * len(sequences)
    for step in _pack([len(s) for s in sequences], max_tokens, max_seqs, size, free_blocks):
        inputs = _step_inputs([sequences[i] for i in step], runner.token_buckets,
                              runner.seq_buckets, size, runner.batch.max_blocks)
        md = AttentionMetadata(*(inputs[k] for k in (
            "slot_mapping", "block_tables", "seq_lens", "query_start_loc", "logits_indices")))
        ids, positions, md = jax.device_put((inputs["input_ids"], inputs["positions"], md),
                                            runner.input_sharding)
        forward = runner.compiled.forward(len(inputs["input_ids"]), len(inputs["seq_lens"]))
        _, hidden, runner.kv_caches = forward(runner.param_leaves, runner.kv_caches, ids,
                                              positions, md, no_previous)  # hidden [T, D]
        hidden = np.asarray(hidden, np.float32)
        for j, i in enumerate(step):
            out[i] = hidden[inputs["query_start_loc"][j] + np.asarray(rows[i], np.int64)]
    return out


def _pack(lengths: list[int], max_tokens: int, max_seqs: int, block_size: int,
          free_blocks: int) -> list[list[int]]:
    """Sequence indices grouped into steps of at most `max_tokens` tokens, `max_seqs`
    sequences and `free_blocks` KV blocks, in order."""
    steps, tokens, blocks = [[]], 0, 0
    for i, n in enumerate(lengths):
        need = -(-n // block_size)
        if n > max_tokens or need > free_blocks:
            raise ValueError(f"a sequence of {n} tokens does not fit one step "
                             f"({max_tokens} tokens, {free_blocks} KV blocks)")
        if steps[-1] and (tokens + n > max_tokens or len(steps[-1]) == max_seqs
                          or blocks + need > free_blocks):
            steps.append([])
            tokens = blocks = 0
        steps[-1].append(i)
        tokens, blocks = tokens + n, blocks + need
    return [s for s in steps if s]


def _step_inputs(seqs: list[list[int]], token_buckets, seq_buckets, block_size: int,
                 max_blocks: int) -> dict[str, np.ndarray]:
    """One step's padded host arrays (the runner's layout, `runner/input_batch.py`): each
    sequence whole, from position 0, in its own blocks 1, 2, ...; padding in block 0."""
    from jaxserve.runner.buckets import pad_to_bucket

    lengths = np.asarray([len(s) for s in seqs], np.int32)  # [b]
    num_tokens, b = int(lengths.sum()), len(seqs)
    t_pad, b_pad = pad_to_bucket(num_tokens, token_buckets), pad_to_bucket(b, seq_buckets)
    query_start_loc = np.full(b_pad + 1, num_tokens, np.int32)  # [B+1]
    query_start_loc[0] = 0
    np.cumsum(lengths, out=query_start_loc[1:b + 1])
    input_ids = np.zeros(t_pad, np.int32)  # [T]
    input_ids[:num_tokens] = np.concatenate(seqs)
    positions = np.zeros(t_pad, np.int32)  # [T]
    positions[:num_tokens] = np.concatenate([np.arange(n) for n in lengths])
    slot_mapping = np.arange(t_pad, dtype=np.int32) % block_size  # [T]; padding: block 0
    block_tables = np.zeros((b_pad, max_blocks), np.int32)  # [B, max_blocks]
    first = 1
    for j, n in enumerate(lengths):
        blocks = np.arange(first, first + -(-n // block_size), dtype=np.int32)
        block_tables[j, :len(blocks)] = blocks
        pos = np.arange(n)
        slot_mapping[query_start_loc[j]:query_start_loc[j + 1]] = (
            blocks[pos // block_size] * block_size + pos % block_size)
        first += len(blocks)
    seq_lens = np.zeros(b_pad, np.int32)  # [B]
    seq_lens[:b] = lengths
    logits_indices = np.zeros(b_pad, np.int32)  # [B]
    logits_indices[:b] = query_start_loc[1:b + 1] - 1
    return dict(input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
                block_tables=block_tables, seq_lens=seq_lens,
                query_start_loc=query_start_loc, logits_indices=logits_indices)


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """Free-running greedy outputs against the reference's: the share of positions with the
    same token, and the mean share of each output before its first difference."""
    same = [np.mean(np.equal(r, g)) for r, g in zip(ref, got)]
    prefix = []
    for r, g in zip(ref, got):
        diff = np.flatnonzero(np.not_equal(r, g))
        prefix.append((diff[0] if len(diff) else len(r)) / len(r))
    return float(np.mean(same)), float(np.mean(prefix))


@dataclasses.dataclass(frozen=True)
class RowComparison:
    """Per row of two heads' logits: what the benchmark's statistics are made of."""

    max_abs_diff: np.ndarray  # [n] max over V of |variant - reference|
    mean_abs_diff: np.ndarray  # [n] mean over V of |variant - reference|
    max_abs_ref: np.ndarray  # [n] max over V of |reference|
    same_argmax: np.ndarray  # [n] bool: the two argmaxes are the same token
    ref_margin: np.ndarray  # [n] the reference's top-1 logit minus its top-2 logit


class LMHead:
    """An engine's LM head (its params, kept alive after the engine is gone) over hidden
    rows, in chunks of CHUNK_ROWS."""

    def __init__(self, llm):
        from jaxserve.model.forward import compute_logits

        runner = llm.llm_engine.runner
        graphdef, self._params = runner.graphdef, runner.params
        self.logits = jax.jit(lambda params, hidden: compute_logits(graphdef, params, hidden))

    def chunks(self, hidden: np.ndarray):  # [n, D] -> [CHUNK_ROWS, V] each, zero-padded
        for start in range(0, len(hidden), CHUNK_ROWS):
            part = np.zeros((CHUNK_ROWS, hidden.shape[1]), np.float32)
            part[:len(hidden) - start] = hidden[start:start + CHUNK_ROWS]
            yield min(CHUNK_ROWS, len(hidden) - start), self.logits(self._params, part)

    def log_probs(self, hidden: np.ndarray,  # [n, D]
                  targets: np.ndarray,  # [n] int: each row's next token
                  ) -> np.ndarray:  # [n] float32
        out = []
        for start, (n, logits) in zip(range(0, len(hidden), CHUNK_ROWS), self.chunks(hidden)):
            ids = np.zeros(CHUNK_ROWS, np.int32)
            ids[:n] = targets[start:start + n]
            out.append(np.asarray(_target_log_probs(logits, ids))[:n])
        return np.concatenate(out)


def compare(reference: LMHead, variant: LMHead, ref_hidden: np.ndarray,  # [n, D]
            var_hidden: np.ndarray) -> RowComparison:  # [n, D]
    parts = [np.asarray(jnp.stack(_row_stats(ref, got)))[:, :n]  # [5, n] each
             for (n, ref), (_, got) in zip(reference.chunks(ref_hidden),
                                           variant.chunks(var_hidden))]
    stats = np.concatenate(parts, axis=1)  # [5, n]
    return RowComparison(stats[0], stats[1], stats[2], stats[3] > 0.5, stats[4])


@jax.jit
def _row_stats(ref, got):  # [n, V] float32 each -> five [n] float32
    diff = jnp.abs(got - ref)
    same = jnp.argmax(ref, -1) == jnp.argmax(got, -1)
    top2 = jax.lax.top_k(ref, 2)[0]  # [n, 2]
    return (diff.max(-1), diff.mean(-1), jnp.abs(ref).max(-1), same.astype(jnp.float32),
            top2[:, 0] - top2[:, 1])


@jax.jit
def _target_log_probs(logits, targets):  # [n, V] float32, [n] int32 -> [n] float32
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
