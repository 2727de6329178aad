"""What the engine hands back per request: vLLM-compatible output objects.

`RequestOutput` holds one entry per sample (`n` of them); text, token ids and logprobs are
cumulative, so a streaming caller sends the part past what it already sent.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    logprob: float  # natural log of the token's probability under the raw logits
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None  # the token's text, when a tokenizer is loaded


# One position: token id -> Logprob, the chosen token first, then the top-k.
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class CompletionOutput:
    index: int  # which of the n samples
    text: str  # visible text so far (stop strings trimmed)
    token_ids: list[int]  # generated ids so far
    cumulative_logprob: float | None  # sum of chosen-token logprobs, when logprobs are on
    logprobs: list[PositionLogprobs] | None  # per generated token, when logprobs are on
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # None when the prompt came as token ids without a tokenizer
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None  # None for the first prompt token
    outputs: list[CompletionOutput]
    finished: bool  # all n samples are done
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
