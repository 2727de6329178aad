"""POST /v1/completions: prompts (text or token ids, one or many) in, choices out.

Choice `i * n + j` is sample `j` of prompt `i`. Streaming sends one SSE chunk per choice
that moved, with the text and logprobs past what was already sent; `echo` prefixes the
prompt (and, with logprobs, its token logprobs). Logprobs follow OpenAI's completions
format: tokens, token_logprobs, top_logprobs (top-k plus the chosen token), text_offset.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from jaxserve.entrypoints.openai import serving_common as common
from jaxserve.entrypoints.openai.errors import bad_request
from jaxserve.entrypoints.openai.protocol import (CompletionChoice, CompletionLogprobs,
                                                  CompletionRequest, CompletionResponse, Usage)
from jaxserve.outputs import RequestOutput


async def create_completion(state: common.ServerState, request: web.Request,
                            ) -> web.StreamResponse:
    req = await common.parse_body(request, CompletionRequest)
    model = state.check_model(req.model)
    params = common.sampling_params(state, req)
    prompts = [common.Prompt(text, ids, common.clamp_max_tokens(params, len(ids),
                                                                state.max_model_len))
               for text, ids in _prompt_inputs(state, req)]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = await common.submit(state, request_id, prompts, req)
    builder = _Builder(state, req, prompts)
    if req.stream:
        return await common.stream_sse(request, state, streams,
                                       _chunks(req, request_id, model, streams, builder))
    finals = await common.final_outputs(state, streams)
    choices = [builder.choice(i, final, sample, delta=False)
               for i, final in enumerate(finals) for sample in final.outputs]
    for choice in choices:
        final = finals[choice.index // req.n]
        choice.prompt_logprobs = common.prompt_logprobs(state, req, final)
    return web.json_response(text=CompletionResponse(
        id=request_id, model=model, choices=choices, usage=_usage(prompts, finals),
    ).model_dump_json())


def _prompt_inputs(state: common.ServerState, req: CompletionRequest,
                   ) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) per prompt; 400 for no prompt or text without a tokenizer (an
    empty one is the engine's to refuse)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        batch = [prompt]
    elif prompt and isinstance(prompt[0], int):
        batch = [prompt]
    else:
        batch = list(prompt)
    if not batch:
        raise bad_request("prompt must not be empty", param="prompt")
    tokenizer = state.tokenizer
    inputs = []
    for item in batch:
        if isinstance(item, str):
            if tokenizer is None:
                raise bad_request("text prompts need a tokenizer; send token ids", "prompt")
            ids = common.encode_text(state, item, add_special_tokens=req.add_special_tokens,
                                     param="prompt") if item else []
            inputs.append((item, ids))
        else:
            text = (common.decode_ids(state, item, param="prompt")
                    if tokenizer is not None and req.echo else None)
            inputs.append((text, list(item)))
    return inputs


@dataclasses.dataclass
class _Sent:
    """What one choice has sent so far (streaming)."""

    num_chars: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False  # the echo (if any) went out
    done: bool = False


class _Builder:
    """Builds choices, keeping per-choice progress so that stream chunks carry deltas."""

    def __init__(self, state: common.ServerState, req: CompletionRequest,
                 prompts: list[common.Prompt]):
        self.state, self.req, self.prompts = state, req, prompts
        self.sent: dict[int, _Sent] = {}

    def choice(self, prompt_index: int, output: RequestOutput, sample, *, delta: bool,
               ) -> CompletionChoice | None:
        """The whole choice, or (`delta`) its part not sent yet: None if nothing moved."""
        req, prompt = self.req, self.prompts[prompt_index]
        index = prompt_index * req.n + sample.index
        sent = self.sent.setdefault(index, _Sent()) if delta else _Sent()
        if sent.done:
            return None
        text, logprobs = "", CompletionLogprobs() if req.logprobs is not None else None
        if not sent.started and req.echo:
            text = prompt.text or ""
            if logprobs is not None:
                positions = output.prompt_logprobs or [None] * len(prompt.token_ids)
                self._add(logprobs, sent, prompt.token_ids, positions)
        new_text = sample.text[sent.num_chars:]
        new_ids = sample.token_ids[sent.num_tokens:]
        if delta and sent.started and not new_text and not new_ids \
                and sample.finish_reason is None:
            return None
        if logprobs is not None and sample.logprobs is not None:
            self._add(logprobs, sent, new_ids, sample.logprobs[sent.num_tokens:])
        sent.started, sent.num_chars = True, len(sample.text)
        sent.num_tokens = len(sample.token_ids)
        sent.done = sample.finish_reason is not None
        return CompletionChoice(index=index, text=text + new_text, logprobs=logprobs,
                                finish_reason=sample.finish_reason,
                                stop_reason=sample.stop_reason)

    def _add(self, logprobs: CompletionLogprobs, sent: _Sent, token_ids, positions) -> None:
        num_top = self.req.logprobs
        for token_id, position in zip(token_ids, positions):
            entry = position.get(token_id) if position else None
            token = common.token_text(self.state, token_id, entry)
            logprobs.tokens.append(token)
            logprobs.text_offset.append(sent.text_offset)
            sent.text_offset += len(token)
            if entry is None:  # the first prompt token has no logprob
                logprobs.token_logprobs.append(None)
                logprobs.top_logprobs.append(None)
                continue
            logprobs.token_logprobs.append(common.clamp_logprob(entry.logprob))
            top: dict[str, float] = {}  # tokens that decode alike keep the likeliest
            for tid, lp in [*common.top_entries(position, num_top), (token_id, entry)]:
                top.setdefault(common.token_text(self.state, tid, lp),
                               common.clamp_logprob(lp.logprob))
            logprobs.top_logprobs.append(top)


def _usage(prompts: list[common.Prompt], outputs: list[RequestOutput]) -> Usage:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(s.token_ids) for o in outputs for s in o.outputs)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def _chunks(req: CompletionRequest, request_id: str, model: str, streams,
                  builder: _Builder) -> AsyncIterator[bytes]:
    latest: dict[int, RequestOutput] = {}
    async for i, output in common.merge_streams(streams):
        latest[i] = output
        choices = [builder.choice(i, output, sample, delta=True) for sample in output.outputs]
        for choice in choices:  # one choice per chunk, interleaved by index
            if choice is not None:
                yield common.sse(CompletionResponse(id=request_id, model=model, choices=[choice]))
    if req.include_usage:
        yield common.sse(CompletionResponse(id=request_id, model=model, choices=[],
                                            usage=_usage(builder.prompts, list(latest.values()))))
