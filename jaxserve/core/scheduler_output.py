"""What crosses the scheduler/runner line each step, in both directions, and back to the engine.

`SchedulerOutput` is the only thing the runner gets: requests new to it in full, requests it
already knows as deltas (new blocks, new tokens), tokens per request and the ids to forget.
`ModelRunnerOutput` is the runner's answer (sampled ids, and `TokenLogprobs` records where
asked), and `RequestUpdate` what the scheduler tells the engine per request after a step.
All frozen; shapes use the one legend.
"""

from __future__ import annotations

import dataclasses
from ..sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True, slots=True)
class NewRequestData:
    """A request the runner has not seen: admitted for the first time this step."""

    req_id: str
    prompt_token_ids: tuple[int, ...]  # [P] the whole prompt
    sampling_params: SamplingParams  # the runner builds its sampling arrays from it
    block_ids: tuple[int, ...]  # the whole block table: prefix hit + new blocks
    num_computed_tokens: int  # tokens already in the cache (prefix hit); inputs start here
    eos_token_ids: tuple[int, ...] = ()  # masked by the sampler until min_tokens are out


@dataclasses.dataclass(frozen=True, slots=True)
class CachedRequestData:
    """A request the runner knows: what changed since it was last scheduled."""

    req_id: str
    # Token ids the runner has not been given yet, to append to its list (the rest of a
    # chunked prompt; the runner appends the tokens it samples itself). Resumed: every
    # token id, prompt + outputs, to rebuild the runner's state.
    new_token_ids: tuple[int, ...]
    # Blocks appended to the table this step. Resumed: the whole new block table.
    new_block_ids: tuple[int, ...]
    num_computed_tokens: int  # tokens already in the cache; this step's inputs start here
    resumed_from_preemption: bool  # replace (not extend) the runner's tokens and blocks


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One engine step: which requests run, with how many tokens each."""

    scheduled_new_reqs: tuple[NewRequestData, ...]
    scheduled_cached_reqs: tuple[CachedRequestData, ...]  # running ones, then resumed ones
    # req_id -> tokens computed this step (B entries, sum = T). Insertion order is the
    # scheduling order: running requests first, then admitted ones. Treat as read-only.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int  # T before padding; <= max_num_batched_tokens
    # Requests that reach the end of their known tokens this step, i.e.
    # num_computed_tokens + num_scheduled_tokens == num_tokens: the runner samples one
    # token for each; the others are partial prefill chunks whose logits are dropped.
    sampling_req_ids: frozenset[str]
    finished_req_ids: frozenset[str]  # finished or aborted since the last step: forget them
    preempted_req_ids: frozenset[str]  # blocks taken back this step: drop them from the batch
    # Structured outputs, filled in by the engine (engine/structured_outputs.py): the
    # requests of sampling_req_ids that a grammar constrains, and their packed masks
    # (bit i of word w allows id 32 * w + i; W = ceil(V / 32) or wider, extra ids unset).
    structured_output_req_ids: tuple[str, ...] = ()
    grammar_bitmask: object = None  # [G, W] int32 numpy array, G = len(above); None if G = 0

    @property
    def num_reqs(self) -> int:
        """B, the number of scheduled requests."""
        return len(self.num_scheduled_tokens)

    def samples(self, req_id: str) -> bool:
        """True when the runner must sample a token for this request this step."""
        return req_id in self.sampling_req_ids


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The logprobs of one scored token: a sampled one, or the next prompt token at one
    position of a prompt chunk. Log-softmax of the raw logits (vLLM's default), as the
    sampler (`SamplerOutput`) and the prompt-logprobs program compute them. k is the
    request's `logprobs` for a sampled token, its `prompt_logprobs` for a prompt token."""

    token_id: int  # the sampled token, or the prompt token that follows the position
    logprob: float  # its log probability
    rank: int  # 1 + the number of vocabulary tokens more likely than it
    top_ids: tuple[int, ...]  # [k] the k most likely ids, most likely first
    top_logprobs: tuple[float, ...]  # [k] their logprobs


@dataclasses.dataclass(frozen=True, slots=True)
class ModelRunnerOutput:
    """The runner's answer to one `SchedulerOutput`."""

    # req_id -> tokens sampled this step (one each, in sampling_req_ids; [] or absent else).
    sampled_token_ids: dict[str, list[int]]
    # req_id -> one record per sampled token, for the requests that ask for `logprobs`
    logprobs: dict[str, list[TokenLogprobs]] | None = None
    # req_id -> one record per position of this step's chunk whose next token is in the
    # prompt, for the requests that ask for `prompt_logprobs`
    prompt_logprobs: dict[str, list[TokenLogprobs]] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class RequestUpdate:
    """What one step did to one request, for the engine's outputs."""

    req_id: str
    new_token_ids: tuple[int, ...]  # tokens accepted this step (none after a stop)
    finished: bool  # the request ended this step and its blocks are free
    finish_reason: str | None  # "stop" | "length" | None (aborts come from the engine)
    stop_reason: int | str | None  # the stop token id that ended it; None for EOS/length
