"""POST /v1/chat/completions: messages through the chat template in, assistant messages out.

`render_chat` applies the tokenizer's (or --chat-template's, or the request's) template with
`add_generation_prompt`, `continue_final_message`, `chat_template_kwargs` and the request's
`tools`; chat_output.py turns each choice's text into the message (reasoning, content,
tool calls). Streaming sends each choice's role first, then its deltas, then its finish
reason; logprobs follow OpenAI's chat format
(`content: [{token, logprob, bytes, top_logprobs}]`).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from jaxserve.entrypoints.openai import serving_common as common
from jaxserve.entrypoints.openai.chat_output import ChoiceOutput
from jaxserve.entrypoints.openai.tool_parsers import KEEP_SPECIAL_TOKENS
from jaxserve.entrypoints.openai.errors import APIError, bad_request
from jaxserve.entrypoints.openai.protocol import (ChatChoice, ChatCompletionChunk,
                                                  ChatCompletionRequest, ChatCompletionResponse,
                                                  ChatLogprobs, ChatMessage, ChatStreamChoice,
                                                  DeltaMessage, TokenLogprob, TopLogprob, Usage)
from jaxserve.outputs import RequestOutput

_ROLE = "assistant"


def render_chat(state: common.ServerState, messages: list[ChatMessage], *,
                add_generation_prompt: bool, continue_final_message: bool,
                chat_template: str | None, chat_template_kwargs: dict | None,
                add_special_tokens: bool = False, tools: list[dict] | None = None,
                ) -> tuple[str, list[int]]:
    """(prompt text, token ids) of a conversation; 400 for anything the template rejects."""
    tokenizer = state.tokenizer
    if tokenizer is None:
        raise bad_request("chat needs a tokenizer (the server runs without one)")
    if chat_template is not None and not state.trust_request_chat_template:
        raise bad_request("chat_template in a request needs a server started with "
                          "--trust-request-chat-template", param="chat_template")
    template = chat_template or state.chat_template
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise bad_request("the model has no chat template; start the server with "
                          "--chat-template or send chat_template", param="chat_template")
    try:
        conversation = [m.template_dict() for m in messages]
    except ValueError as error:
        raise bad_request(str(error), param="messages") from None
    try:
        text = tokenizer.apply_chat_template(
            conversation, **(chat_template_kwargs or {}), tokenize=False,
            chat_template=template, tools=tools, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise bad_request(f"the chat template failed: {error}", param="messages") from None
    except Exception as error:  # jinja2 TemplateError and friends
        raise bad_request(f"the chat template failed: {type(error).__name__}: {error}",
                          param="messages") from None
    return text, common.encode_text(state, text, add_special_tokens=add_special_tokens,
                                    param="messages")


async def create_chat_completion(state: common.ServerState, request: web.Request,
                                 ) -> web.StreamResponse:
    req = await common.parse_body(request, ChatCompletionRequest)
    model = state.check_model(req.model)
    params = common.sampling_params(state, req)
    if state.tool_call_parser in KEEP_SPECIAL_TOKENS and req.auto_parses(state.tool_call_parser):
        params = dataclasses.replace(params, skip_special_tokens=False)  # the calls' tags
    text, ids = render_chat(state, req.messages, add_generation_prompt=req.add_generation_prompt,
                            continue_final_message=req.continue_final_message,
                            chat_template=req.chat_template,
                            chat_template_kwargs=req.chat_template_kwargs,
                            add_special_tokens=req.add_special_tokens,
                            tools=req.template_tools())
    prompt = common.Prompt(text, ids, common.clamp_max_tokens(params, len(ids),
                                                              state.max_model_len))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    try:
        streams = await common.submit(state, request_id, [prompt], req, prompt_param="messages")
    except APIError as error:  # the grammar compiler's word on a tool's parameters
        if error.param != "structured_outputs" or req.forced_tool() is None:
            raise
        raise bad_request("tools: a parameters schema is invalid: " + error.message.removeprefix(
            "structured_outputs: "), param="tools") from None
    last = req.messages[-1]
    echo = last.template_dict()["content"] if req.echo and last.role == _ROLE else ""
    if req.stream:
        outputs = [_choice_output(state, req, text, echo) for _ in range(req.n)]
        return await common.stream_sse(request, state, streams, _chunks(
            state, req, request_id, model, streams[0], prompt, outputs))
    final = (await common.final_outputs(state, streams))[0]
    choices = []
    for s in final.outputs:
        output = _choice_output(state, req, text, echo)
        message = output.message(s.text)
        choices.append(ChatChoice(index=s.index, message=message,
                                  finish_reason=output.finish_reason or s.finish_reason,
                                  logprobs=_logprobs(state, req, s.token_ids, s.logprobs),
                                  stop_reason=s.stop_reason))
    return web.json_response(text=ChatCompletionResponse(
        id=request_id, model=model, choices=choices, usage=_usage(prompt, final),
        prompt_logprobs=common.prompt_logprobs(state, req, final)).model_dump_json())


def _logprobs(state: common.ServerState, req: ChatCompletionRequest, token_ids, positions,
              ) -> ChatLogprobs | None:
    if not req.logprobs or positions is None:
        return None
    num_top = req.top_logprobs or 0
    content = []
    for token_id, position in zip(token_ids, positions):
        entry = position[token_id]
        token = common.token_text(state, token_id, entry)
        top = [TopLogprob(token=(t := common.token_text(state, tid, lp)),
                          logprob=common.clamp_logprob(lp.logprob), bytes=list(t.encode()))
               for tid, lp in common.top_entries(position, num_top)]
        content.append(TokenLogprob(token=token, logprob=common.clamp_logprob(entry.logprob),
                                    bytes=list(token.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def _usage(prompt: common.Prompt, output: RequestOutput | None) -> Usage:
    completion = sum(len(s.token_ids) for s in output.outputs) if output is not None else 0
    return Usage(prompt_tokens=len(prompt.token_ids), completion_tokens=completion,
                 total_tokens=len(prompt.token_ids) + completion)


@dataclasses.dataclass
class _Sent:
    num_chars: int = 0
    num_tokens: int = 0
    done: bool = False


def _choice_output(state: common.ServerState, req: ChatCompletionRequest, prompt_text: str,
                   echo: str) -> ChoiceOutput:
    return ChoiceOutput(req, tool_call_parser=state.tool_call_parser,
                        reasoning_parser=state.reasoning_parser, prompt=prompt_text, echo=echo)


async def _chunks(state, req: ChatCompletionRequest, request_id: str, model: str, stream,
                  prompt: common.Prompt, outputs: list[ChoiceOutput]) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(choices, usage=None) -> bytes:
        return common.sse(ChatCompletionChunk(id=request_id, created=created, model=model,
                                              choices=choices, usage=usage))

    for index, output in enumerate(outputs):
        yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(
            role=_ROLE, content=output.first_content))])
    sent = [_Sent() for _ in range(req.n)]
    last: RequestOutput | None = None
    async for last in stream:
        for sample in last.outputs:
            progress, output = sent[sample.index], outputs[sample.index]
            if progress.done or not (len(sample.text) > progress.num_chars
                                     or len(sample.token_ids) > progress.num_tokens
                                     or sample.finish_reason):
                continue
            final = sample.finish_reason is not None
            delta = output.delta(sample.text, final=final)
            if delta is None and not final and output.holds:  # its logprobs go later
                continue
            new_ids = sample.token_ids[progress.num_tokens:]
            logprobs = _logprobs(state, req, new_ids, None if sample.logprobs is None
                                 else sample.logprobs[progress.num_tokens:])
            progress.num_chars, progress.num_tokens = len(sample.text), len(sample.token_ids)
            progress.done = final
            yield chunk([ChatStreamChoice(
                index=sample.index, delta=delta or DeltaMessage(content=output.empty_content),
                logprobs=logprobs,
                finish_reason=output.finish_reason or sample.finish_reason,
                stop_reason=sample.stop_reason)])
    if req.include_usage:
        yield chunk([], usage=_usage(prompt, last))
