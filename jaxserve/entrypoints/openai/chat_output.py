"""A chat choice's output text -> the assistant message (whole, or as stream deltas).

The reasoning parser (--reasoning-parser) takes the think block off first; the tool-call
parsing (a forced call, or the auto parser) reads the rest, the answer, only. A stream sends
reasoning deltas as they come, then the answer's content and the auto parser's tool calls
(name first, then the arguments in pieces); a forced call is held back and sent whole in
the chunk that ends the choice.
"""

from __future__ import annotations

from jaxserve.entrypoints.openai.protocol import (AssistantMessage, ChatCompletionRequest,
                                                  DeltaMessage)
from jaxserve.entrypoints.openai.tool_parsers.stream import ToolCallStream
from jaxserve.entrypoints.openai.tools import DeltaFunctionCall, DeltaToolCall
from jaxserve.reasoning import ReasoningParser, ReasoningStream


class ChoiceOutput:
    """One choice's parsers: `delta(text, final)` per stream chunk, `message(text)` once."""

    def __init__(self, req: ChatCompletionRequest, *, tool_call_parser: str | None,
                 reasoning_parser: ReasoningParser | None, prompt: str, echo: str = ""):
        self._req = req
        self._tool_call_parser = tool_call_parser
        self.holds = req.holds_output()  # a forced call goes out whole, once done
        self._calls = (ToolCallStream(tool_call_parser) if req.auto_parses(tool_call_parser)
                       else None)
        self._echo = echo  # the final assistant message's text, which the answer continues
        self._reasoning = ReasoningStream(reasoning_parser, ended_in_prompt=(
            reasoning_parser is not None and reasoning_parser.ended_in(prompt)))
        self.finish_reason: str | None = None  # "tool_calls" once the output is calls

    def message(self, text: str) -> AssistantMessage:
        """The whole output's message."""
        reasoning, content = self._reasoning.feed(text, final=True)
        # All reasoning: no content (vLLM's None), where a plain empty output has "".
        message = AssistantMessage(content=self._echo + content or (None if reasoning else ""),
                                   **self._reasoning_fields(reasoning))
        parsed = self._req.tool_calls_in(content, self._tool_call_parser)
        if parsed is not None:
            message.content, message.tool_calls = parsed
            self.finish_reason = "tool_calls"
        return message

    def delta(self, text: str, *, final: bool) -> DeltaMessage | None:
        """What the output `text` (cumulative) adds to the stream; None: nothing yet."""
        reasoning, content = self._reasoning.feed(text, final=final)
        delta = DeltaMessage(content=content or None, **self._reasoning_fields(reasoning))
        if self._calls is not None:
            content, calls = self._calls.feed(self._reasoning.content, final=final)
            delta.content = content or None
            delta.tool_calls = [DeltaToolCall(
                index=c.index, id=c.id, type=c.id and "function",
                function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
                for c in calls] or None
            if self._calls.num_calls:
                self.finish_reason = "tool_calls"
        if self.holds:
            delta.content = None
            if final:
                parsed = self._req.tool_calls_in(self._reasoning.content, self._tool_call_parser)
                if parsed is None:
                    delta.content = self._reasoning.content or None
                else:
                    delta.content, calls = parsed
                    delta.tool_calls = [DeltaToolCall(
                        index=i, id=call.id, type="function", function=DeltaFunctionCall(
                            **call.function.model_dump())) for i, call in enumerate(calls)]
                    self.finish_reason = "tool_calls"
        if delta.content is None and delta.reasoning is None and not delta.tool_calls:
            return None
        return delta

    @property
    def first_content(self) -> str | None:
        """The content of the stream's first (role) chunk: the echo; none where the output
        may be tool calls only (so that the SDK's accumulated content stays None)."""
        return self._echo or self.empty_content

    @property
    def empty_content(self) -> str | None:
        """The content of a chunk with nothing new: "", or None where the output may be
        tool calls (a content of calls is None)."""
        return None if self.holds or self._calls is not None else ""


    def _reasoning_fields(self, text: str) -> dict[str, str | None]:
        """The reasoning under both names; none when the request asks for none."""
        text = (text if self._req.include_reasoning else "") or None
        return {"reasoning_content": text, "reasoning": text}
