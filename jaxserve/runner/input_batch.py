"""SchedulerOutput -> the padded numpy arrays of one step.

The runner keeps each live request's token ids, block table and sampling parameters in
preallocated rows (`[R, ...]`, R = max_num_seqs) across steps; a step only appends what
changed and then gathers the scheduled rows with vectorized numpy (no per-token Python).
Everything is padded to the step's (token bucket, sequence bucket): padding tokens write
into the null block 0, padding sequences are empty and read block 0.
The batch appends the tokens it samples itself (`append_sampled`); a token still being
sampled by the step in flight (async scheduling) becomes a sample link, input id
`link_to_sample(i)` = -1 - i, i its sequence's index in that step (see sample_links.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.runner.buckets import pad_to_bucket
from jaxserve.core.scheduler_output import SchedulerOutput
from jaxserve.runner.sample_links import link_to_sample
from jaxserve.runner.sampling_rows import SamplingRows, SamplingSetup


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Host arrays of one step, padded; the runner moves them to the device in one go."""

    input_ids: np.ndarray        # [T] int32; < 0: sample links (sample_links.py)
    positions: np.ndarray        # [T] int32
    slot_mapping: np.ndarray     # [T] int32; padding -> slots of block 0
    block_tables: np.ndarray     # [B, max_blocks] int32; padding -> 0
    seq_lens: np.ndarray         # [B] int32; 0 for padding sequences
    query_start_loc: np.ndarray  # [B+1] int32
    logits_indices: np.ndarray   # [B] int32 index in T of each sequence's last token
    req_ids: list[str]           # the B_real scheduled requests, in row order
    num_tokens: int              # T_real before padding
    rows: np.ndarray             # [B_real] int32 their rows
    generations: np.ndarray      # [B_real] int64 the rows' placements (see append_sampled)


class InputBatch:
    """Per-request rows kept across steps, and `prepare()` for each step."""

    def __init__(self, *, max_num_seqs: int, max_model_len: int, block_size: int,
                 vocab_size: int, token_buckets: tuple[int, ...], seq_buckets: tuple[int, ...],
                 seed: int = 0):
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.token_buckets, self.seq_buckets = token_buckets, seq_buckets
        rows = max_num_seqs
        self.token_ids = np.zeros((rows, max_model_len), np.int32)  # [R, max_model_len]
        self.num_tokens = np.zeros(rows, np.int32)                   # [R] ids known per row
        self.num_computed = np.zeros(rows, np.int32)                 # [R] in the cache
        self.block_table = np.zeros((rows, self.max_blocks), np.int32)  # [R, max_blocks]
        self.num_blocks = np.zeros(rows, np.int32)                   # [R]
        self.generation = np.zeros(rows, np.int64)  # [R] placements so far of each row
        self.sampling = SamplingRows(rows, vocab_size=vocab_size, max_model_len=max_model_len)
        self._free_rows = list(range(rows - 1, -1, -1))
        self.row_of: dict[str, int] = {}
        # req_id -> every live request's sampling setup, kept through preemption
        self._setups: dict[str, SamplingSetup] = {}
        self._seed_rng = np.random.default_rng(seed)  # seeds of requests that bring none

    # -- per-request state -------------------------------------------------------------
    def _place(self, req_id: str, token_ids, block_ids, num_computed: int) -> int:
        if not self._free_rows:
            raise RuntimeError(f"more than {len(self.num_tokens)} requests in the batch")
        row = self._free_rows.pop()
        self.row_of[req_id] = row
        self.generation[row] += 1
        self.token_ids[row, :len(token_ids)] = token_ids
        self.num_tokens[row] = len(token_ids)
        self.block_table[row, :len(block_ids)] = block_ids
        self.block_table[row, len(block_ids):] = 0
        self.num_blocks[row] = len(block_ids)
        self.num_computed[row] = num_computed
        self.sampling.set_row(row, self._setups[req_id])
        return row

    def _release_row(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self._free_rows.append(row)

    def _apply(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids:
            self._release_row(req_id)
            self._setups.pop(req_id, None)
        for req_id in out.preempted_req_ids:
            self._release_row(req_id)
        for new in out.scheduled_new_reqs:
            params = new.sampling_params
            seed = params.seed if params.seed is not None else int(
                self._seed_rng.integers(2**32))
            self._setups[new.req_id] = SamplingSetup(params, new.eos_token_ids,
                                                     len(new.prompt_token_ids), seed)
            self._place(new.req_id, new.prompt_token_ids, new.block_ids, new.num_computed_tokens)
        for cached in out.scheduled_cached_reqs:
            if cached.resumed_from_preemption:
                self._release_row(cached.req_id)
                self._place(cached.req_id, cached.new_token_ids, cached.new_block_ids,
                            cached.num_computed_tokens)
                continue
            row = self.row_of[cached.req_id]
            n, k = self.num_tokens[row], len(cached.new_token_ids)
            self.token_ids[row, n:n + k] = cached.new_token_ids
            self.num_tokens[row] = n + k
            nb, m = self.num_blocks[row], len(cached.new_block_ids)
            self.block_table[row, nb:nb + m] = cached.new_block_ids
            self.num_blocks[row] = nb + m
            self.num_computed[row] = cached.num_computed_tokens

    def params_of(self, req_id: str):
        return self._setups[req_id].params

    def knows(self, req_id: str) -> bool:
        """Whether the request is still live here (not finished or aborted)."""
        return req_id in self._setups

    def append_sampled(self, inputs: StepInputs, sampling: frozenset[str],
                       token_ids: np.ndarray) -> None:  # [B] sampled ids of that step
        """Appends each sampled token to its row, where the row still holds the request
        it held at `prepare` (finished, preempted or replaced rows are skipped)."""
        n = len(inputs.req_ids)
        keep = np.fromiter((r in sampling for r in inputs.req_ids), bool, n)  # [B_real]
        keep &= self.generation[inputs.rows] == inputs.generations
        rows = inputs.rows[keep]
        pos = inputs.positions[inputs.logits_indices[:n][keep]] + 1  # where each token goes
        wrong = pos != self.num_tokens[rows]
        if wrong.any():
            raise RuntimeError(f"sampled tokens at positions {pos[wrong].tolist()}, but the "
                               f"rows hold {self.num_tokens[rows][wrong].tolist()} tokens")
        inside = pos < self.token_ids.shape[1]
        self.token_ids[rows[inside], pos[inside]] = np.asarray(token_ids)[:n][keep][inside]
        self.num_tokens[rows[inside]] = pos[inside] + 1

    # -- one step ----------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput,
                samples_in_flight: dict[str, int] | None = None) -> StepInputs:
        """Applies the scheduler's deltas and returns the step's padded arrays.
        `samples_in_flight` (`PendingStep.sample_indices()`): req_id -> index in the step in
        flight of each request it samples for; a token of `out` that no row holds yet must
        be one of those, and becomes its sample link."""
        self._apply(out)
        req_ids = list(out.num_scheduled_tokens)
        num_reqs, num_tokens = len(req_ids), out.total_num_scheduled_tokens
        padded_tokens = pad_to_bucket(num_tokens, self.token_buckets)
        padded_reqs = pad_to_bucket(num_reqs, self.seq_buckets)
        rows = np.fromiter((self.row_of[r] for r in req_ids), np.int32, num_reqs)  # [B_real]
        num_sched = np.fromiter(out.num_scheduled_tokens.values(), np.int32, num_reqs)

        query_start_loc = np.full(padded_reqs + 1, num_tokens, np.int32)  # [B+1]
        query_start_loc[0] = 0
        np.cumsum(num_sched, out=query_start_loc[1:num_reqs + 1])
        token_req = np.repeat(np.arange(num_reqs, dtype=np.int32), num_sched)  # [T_real]
        token_rows = rows[token_req]
        computed = self.num_computed[rows]  # [B_real]
        positions_real = (computed[token_req] + np.arange(num_tokens, dtype=np.int32)
                          - query_start_loc[token_req])

        positions = np.zeros(padded_tokens, np.int32)
        positions[:num_tokens] = positions_real
        input_ids = np.zeros(padded_tokens, np.int32)
        input_ids[:num_tokens] = self.token_ids[token_rows, positions_real]
        unknown = positions_real >= self.num_tokens[token_rows]  # [T_real]
        if unknown.any():
            self._link_samples_in_flight(input_ids, unknown, positions_real, token_rows,
                                         [req_ids[i] for i in token_req[unknown]],
                                         samples_in_flight)
        slot_mapping = np.arange(padded_tokens, dtype=np.int32) % self.block_size  # block 0
        blocks = self.block_table[token_rows, positions_real // self.block_size]
        slot_mapping[:num_tokens] = blocks * self.block_size + positions_real % self.block_size

        block_tables = np.zeros((padded_reqs, self.max_blocks), np.int32)
        block_tables[:num_reqs] = self.block_table[rows]
        seq_lens = np.zeros(padded_reqs, np.int32)
        seq_lens[:num_reqs] = computed + num_sched
        logits_indices = np.zeros(padded_reqs, np.int32)
        logits_indices[:num_reqs] = query_start_loc[1:num_reqs + 1] - 1
        return StepInputs(input_ids, positions, slot_mapping, block_tables, seq_lens,
                          query_start_loc, logits_indices, req_ids, num_tokens, rows,
                          self.generation[rows])

    def _link_samples_in_flight(self, input_ids, unknown, positions, token_rows, owners,
                                samples_in_flight: dict[str, int] | None) -> None:
        """Input ids of tokens past a row's known ones: `link_to_sample(i)` where the step in
        flight samples them as its sample i, the one token right after the row's known ones
        (a placeholder's); anything else is a scheduler/runner mismatch."""
        at = np.flatnonzero(unknown)
        index = [(samples_in_flight or {}).get(req_id, -1) for req_id in owners]
        if min(index) < 0 or np.any(positions[at] != self.num_tokens[token_rows[at]]):
            raise RuntimeError(f"tokens of requests {sorted(set(owners))} are neither known "
                               "nor being sampled by the step in flight")
        input_ids[at] = link_to_sample(np.asarray(index, np.int32))
