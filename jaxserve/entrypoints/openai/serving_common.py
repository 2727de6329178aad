"""What completions and chat share: the server state, request parsing, submission and SSE.

`ServerState` is the one object the routes read (engine, served names, limits). A request
body goes through `parse_body` (400/413), `check_model` (404) and `sampling_params` (400);
`clamp_max_tokens` fits the output into the context; `submit` hands prompts to the engine,
which checks them against the model (400 for what it rejects, with its message; 503 when
its waiting queue is full) and `merge_streams` interleaves the outputs of several prompts.
Logprobs are clamped to -9999 so JSON never sees -inf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

import pydantic
from aiohttp import web

from jaxserve.core.scheduler import WaitingQueueFullError
from jaxserve.engine.async_engine import AsyncEngine, RequestStream
from jaxserve.engine.errors import EngineDeadError, RequestAbortedError, RequestFailedError
from jaxserve.entrypoints.openai.errors import APIError, bad_request, from_value_error, sse_error
from jaxserve.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                  OpenAIModel)
from jaxserve.outputs import Logprob, PositionLogprobs
from jaxserve.reasoning import ReasoningParser
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
_MIN_LOGPROB = -9999.0  # what -inf is reported as (JSON has no infinity)
SSE_DONE = b"data: [DONE]\n\n"
# Parameter names an error message may name (for the error body's `param`).
KNOWN_PARAMS = frozenset(CompletionRequest.model_fields) | frozenset(
    ChatCompletionRequest.model_fields)


@dataclasses.dataclass(frozen=True)
class ServerState:
    """Everything a route needs; built once by `build_app`."""

    engine: AsyncEngine
    served_model_names: tuple[str, ...]  # the first one is reported in responses
    model_root: str  # the model path, reported as `root` by /v1/models
    max_logprobs: int = 20  # most (top_)logprobs a request may ask for
    max_n: int = 128  # most samples per prompt: n children each hold a sequence slot
    chat_template: str | None = None  # overrides the tokenizer's template when set
    trust_request_chat_template: bool = False  # requests may bring their own template
    tool_call_parser: str | None = None  # reads "auto" tool calls (--enable-auto-tool-choice)
    reasoning_parser: ReasoningParser | None = None  # splits off the think block

    @property
    def max_model_len(self) -> int:
        return self.engine.model_config.max_model_len

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, name: str | None) -> str:
        """The model name to report; 404 for a name this server does not serve."""
        if name is None or name in self.served_model_names:
            return self.served_model_names[0]
        raise APIError(404, f"The model `{name}` does not exist; this server serves "
                       f"{list(self.served_model_names)}", param="model",
                       code="model_not_found")


_M = TypeVar("_M", bound=OpenAIModel)


async def parse_body(request: web.Request, model: type[_M]) -> _M:
    """The JSON body as `model`: 400 for non-JSON or a schema error (413 comes from aiohttp)."""
    raw = await request.read()
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    except RecursionError:  # the decoder's own bound on nesting
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "unsupported_field":  # request_fields.py names the field
            raise bad_request(message, param=first["ctx"]["param"]) from None
        param = ".".join(str(part) for part in first["loc"] if _is_field(part))
        if not param:  # a rule across fields: the message names the parameter first
            raise from_value_error(ValueError(message), KNOWN_PARAMS) from None
        raise bad_request(f"{param}: {message}", param=param) from None


def _reject_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def _is_field(loc_part: str | int) -> bool:
    """Field names and list indices of a pydantic error location, not union member tags
    ('str', 'list[int]', 'TextPart', 'function-after[...]')."""
    if isinstance(loc_part, int):
        return True
    return not (loc_part in {"str", "int", "float", "bool", "dict", "list"} or "[" in loc_part
                or "-" in loc_part or loc_part[:1].isupper())


def encode_text(state: ServerState, text: str, *, add_special_tokens: bool,
                param: str) -> list[int]:
    """The token ids of `text`; 400 naming `param` for text the tokenizer cannot take (a
    lone surrogate, which JSON can carry, is not a valid Python str for it)."""
    try:
        return state.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except Exception as error:  # noqa: BLE001 - the tokenizer's own error types vary
        raise bad_request(f"{param}: the tokenizer cannot encode it: "
                          f"{type(error).__name__}: {error}", param=param) from None


def decode_ids(state: ServerState, token_ids: list[int], *, param: str) -> str:
    """The text of `token_ids`; 400 naming `param` for ids the tokenizer cannot take."""
    try:
        return state.tokenizer.decode(token_ids)
    except Exception as error:  # noqa: BLE001 - OverflowError, TypeError, ...
        raise bad_request(f"{param}: the tokenizer cannot decode them: "
                          f"{type(error).__name__}: {error}", param=param) from None


def sampling_params(state: ServerState, req: CompletionRequest | ChatCompletionRequest,
                    ) -> SamplingParams:
    """The request's SamplingParams: 400 naming the parameter for any invalid value."""
    for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
        value = getattr(req, name, None)
        if not isinstance(value, bool) and value is not None and value > state.max_logprobs:
            raise bad_request(f"{name} must be at most {state.max_logprobs} (--max-logprobs), "
                              f"got {value}", param=name)
    if req.n > state.max_n:
        raise bad_request(f"n must be at most {state.max_n}, got {req.n}", param="n")
    try:
        params = req.to_sampling_params()
    except ValueError as error:
        raise from_value_error(error, KNOWN_PARAMS) from None
    # The API's own rule: offline (LLMEngine) an id past the vocabulary is a stop never met.
    vocab_size = state.engine.model_config.vocab_size
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        raise bad_request(f"stop_token_ids must be in [0, {vocab_size}), got {bad[0]}",
                          param="stop_token_ids")
    return params


def clamp_max_tokens(params: SamplingParams, num_prompt_tokens: int,
                     max_model_len: int) -> SamplingParams:
    """Fits prompt + output into the context: max_tokens (None = as many as fit) and
    min_tokens are cut down to the room left. A prompt that leaves no room is the engine's
    to refuse (LLMEngine checks every request against the model once)."""
    room = max_model_len - num_prompt_tokens
    if room < 1 or (params.max_tokens is not None and params.max_tokens <= room):
        return params
    return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str | None  # None for token-id prompts without a tokenizer
    token_ids: list[int]
    params: SamplingParams  # with max_tokens clamped for this prompt


async def submit(state: ServerState, request_id: str, prompts: list[Prompt],
                 req: CompletionRequest | ChatCompletionRequest, *,
                 prompt_param: str = "prompt") -> list[RequestStream]:
    """Queues every prompt (ids `request_id-i`), or none: 400/503 on the first rejection.
    The engine validates each request: its ValueError is the 400, with the parameter it
    names (`prompt_param` for the prompt: "messages" for chat).

    All prompts are posted at once, so the engine takes them in one turn (not one step per
    prompt), and a caller that goes away meanwhile aborts every one of them.
    """
    arrival = time.time()
    ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
    try:
        results = await asyncio.gather(*(
            state.engine.add_request(rid, prompt.token_ids, prompt.params, prompt=prompt.text,
                                     arrival_time=arrival, priority=req.priority,
                                     cache_salt=req.cache_salt)
            for rid, prompt in zip(ids, prompts)), return_exceptions=True)
    except BaseException:  # cancelled: the accepted ones too (unknown ids are no-ops)
        for rid in ids:
            state.engine.abort(rid)
        raise
    streams = [r for r in results if isinstance(r, RequestStream)]
    error = next((r for r in results if isinstance(r, BaseException)), None)
    if error is None:
        return streams
    abort_unfinished(state, streams)
    if isinstance(error, WaitingQueueFullError):
        raise APIError(503, f"the server is overloaded: {error}") from None
    if isinstance(error, EngineDeadError):
        raise APIError(503, str(error)) from None
    if isinstance(error, ValueError):
        raise from_value_error(error, KNOWN_PARAMS, prompt_param=prompt_param) from None
    raise error


def abort_unfinished(state: ServerState, streams: list[RequestStream]) -> None:
    for stream in streams:
        if not stream.finished:
            state.engine.abort(stream.request_id)


async def final_outputs(state: ServerState, streams: list[RequestStream]) -> list:
    """The last (finished) output of each stream; aborts them all if the caller goes away."""
    finals = []
    try:
        for stream in streams:
            last = None
            async for last in stream:
                pass
            finals.append(last)
    finally:
        abort_unfinished(state, streams)
    return finals


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, object]]:
    """(stream index, output) as outputs arrive from any of the streams."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                yield i, output
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()


async def stream_sse(request: web.Request, state: ServerState, streams: list[RequestStream],
                     chunks: AsyncGenerator[bytes, None]) -> web.StreamResponse:
    """Sends `chunks` as server-sent events, then `data: [DONE]`. An error after the
    stream started goes in-band (OpenAI body) before [DONE]; a client that hangs up, or
    any way out, aborts whatever is unfinished."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        try:
            async for data in chunks:
                await response.write(data)
        except RequestFailedError as error:  # this request was lost in the engine
            await response.write(sse_error(APIError(500, str(error))))
        except (EngineDeadError, RequestAbortedError) as error:
            await response.write(sse_error(APIError(503, str(error))))
        except ConnectionResetError:
            raise
        except Exception as error:  # noqa: BLE001 - headers are out: report in-band
            logger.exception("error while streaming %s", request.path)
            await response.write(sse_error(APIError(500, f"internal error: {error!r}")))
        await response.write(SSE_DONE)
    except ConnectionResetError:
        pass  # the client left; its requests are aborted below
    finally:
        abort_unfinished(state, streams)
        await chunks.aclose()  # and with it any reads still pending on the streams
    return response


def sse(model: pydantic.BaseModel) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


def clamp_logprob(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def token_text(state: ServerState, token_id: int, entry: Logprob | None = None) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    if state.tokenizer is None:
        return f"token_id:{token_id}"
    return state.tokenizer.decode([token_id])


def prompt_logprobs(state: ServerState, req, output) -> list | None:
    """vLLM's `prompt_logprobs` of a finished output, when the request asked for them."""
    if req.prompt_logprobs is None or output.prompt_logprobs is None:
        return None
    return [None if position is None else {
        tid: {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank,
              "decoded_token": token_text(state, tid, lp)} for tid, lp in position.items()}
        for position in output.prompt_logprobs]


def top_entries(position: PositionLogprobs, num_top: int) -> list[tuple[int, Logprob]]:
    """The `num_top` most likely tokens of one position, most likely first."""
    ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)
    return [(tid, lp) for tid, lp in ranked if lp.rank is not None and lp.rank <= num_top]
