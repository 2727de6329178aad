"""Request and response schemas of the OpenAI API, with vLLM's extra sampling fields.

Requests are parsed with pydantic (a schema error is a 400). Each model's `refused_fields`
(request_fields.py) are the fields it does not implement (a 400 naming the one turned on);
metadata is accepted and ignored, unknown fields ignored with a warning, as in vLLM.
`to_sampling_params()` makes `SamplingParams`, whose validation names any bad parameter
(structured output and tools: modules of their own). Responses are pydantic models too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jaxserve.entrypoints.openai import request_fields
from jaxserve.entrypoints.openai.request_fields import Refused
from jaxserve.entrypoints.openai.structured_fields import StructuredOutputFields
from jaxserve.entrypoints.openai.tools import (DeltaToolCall, Tool, ToolCall, ToolFields,
                                              template_message)
from jaxserve.sampling_params import SamplingParams


class OpenAIModel(BaseModel):
    # Strict scalars, as the schema says and OpenAI does: lax ones would take `true` as
    # token id 1, `"5"` as n = 5 and `0.0` as stream = false (ints still pass as floats).
    model_config = ConfigDict(extra="ignore", strict=True)
    # What a model refuses and what it accepts unread (request_fields.py's tables), and
    # where it sits in a request ("stream_options."), for the param an error names.
    refused_fields: ClassVar[Mapping[str, Refused]] = MappingProxyType({})
    metadata_fields: ClassVar[frozenset[str]] = frozenset()
    param_prefix: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _check_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            request_fields.check_fields(cls.__name__, data, cls.model_fields,
                                        cls.refused_fields, param_prefix=cls.param_prefix,
                                        metadata=cls.metadata_fields)
        return data


class StreamOptions(OpenAIModel):
    refused_fields = request_fields.STREAM_OPTIONS_REFUSED
    param_prefix = "stream_options."
    include_usage: bool | None = False


class _SamplingRequest(OpenAIModel, StructuredOutputFields):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    metadata_fields = request_fields.METADATA_FIELDS
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None
    cache_salt: str | None = None
    priority: int = 0

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.stream and self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported with stream=true")
        return self

    def _sampling_params(self, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams of this request; ValueError (naming the field) for a bad value."""
        bias = None
        if self.logit_bias is not None:
            try:
                bias = {int(token): value for token, value in self.logit_bias.items()}
            except ValueError:
                raise ValueError("logit_bias keys must be token ids (integers as strings), "
                                 f"got {sorted(self.logit_bias)[:3]}") from None
        return SamplingParams(
            n=self.n, temperature=_default(self.temperature, 1.0), top_p=_default(self.top_p, 1.0),
            top_k=_default(self.top_k, 0), min_p=_default(self.min_p, 0.0),
            presence_penalty=_default(self.presence_penalty, 0.0),
            frequency_penalty=_default(self.frequency_penalty, 0.0),
            repetition_penalty=_default(self.repetition_penalty, 1.0),
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
            logprobs=logprobs, prompt_logprobs=self.prompt_logprobs, logit_bias=bias,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            structured_outputs=self.structured_outputs_params())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    refused_fields = request_fields.COMPLETION_REFUSED
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    add_special_tokens: bool = True

    def to_sampling_params(self) -> SamplingParams:
        params = self._sampling_params(max_tokens=self.max_tokens, logprobs=self.logprobs)
        if self.echo and self.logprobs is not None and self.prompt_logprobs is None:
            # echo + logprobs reports the prompt's tokens too, as OpenAI does
            params = dataclasses.replace(params, prompt_logprobs=self.logprobs)
        return params


class TextPart(BaseModel):  # one content part; other types (image_url, ...) are refused
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message; fields beyond role/content (name, tool_calls, ...) reach the template."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None

    def template_dict(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            kinds = sorted({p.type for p in self.content if p.type != "text"})
            if kinds:
                raise ValueError(f"messages: only text content is supported, got {kinds}")
            message["content"] = "\n".join(p.text or "" for p in self.content)
        message.setdefault("content", "")
        return template_message(message)


class ChatCompletionRequest(_SamplingRequest, ToolFields):
    refused_fields = request_fields.CHAT_REFUSED
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    include_reasoning: bool = True  # False: the reasoning parser's think block is dropped

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens=self.requested_max_tokens, logprobs=logprobs)


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None  # the chat form's tools, for the template

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt and messages is required")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools go with messages (the chat form), not prompt")
        return self


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


# -- responses -------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


# vLLM's prompt_logprobs: per prompt token (None for the first), token id -> its numbers.
PromptLogprobs = list[dict[int, dict[str, Any]] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    # The think block (--reasoning-parser), under vLLM's old name and its new one.
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


def _default(value, default):
    return default if value is None else value
