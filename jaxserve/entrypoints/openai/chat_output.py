"""A chat choice's output text -> the assistant message (whole, or as stream deltas).

The reasoning parser (--reasoning-parser) takes the think block off first; the tool-call
parsing (a forced call, or the auto parser) reads the rest, the answer, only. A stream sends
reasoning deltas as they come, then the answer's content; output that may be tool calls is
held back and sent, parsed, in the chunk that ends the choice.
"""

from __future__ import annotations

from jaxserve.entrypoints.openai.protocol import (AssistantMessage, ChatCompletionRequest,
                                                  DeltaMessage)
from jaxserve.entrypoints.openai.tools import DeltaToolCall
from jaxserve.reasoning import ReasoningParser, ReasoningStream


class ChoiceOutput:
    """One choice's parsers: `delta(text, final)` per stream chunk, `message(text)` once."""

    def __init__(self, req: ChatCompletionRequest, *, tool_call_parser: str | None,
                 reasoning_parser: ReasoningParser | None, prompt: str, echo: str = ""):
        self._req = req
        self._tool_call_parser = tool_call_parser
        self.holds = req.holds_output(tool_call_parser)  # calls go out whole, once done
        self._echo = echo  # the final assistant message's text, which the answer continues
        self._reasoning = ReasoningStream(reasoning_parser, ended_in_prompt=(
            reasoning_parser is not None and reasoning_parser.ended_in(prompt)))
        self.finish_reason: str | None = None  # "tool_calls" once the output is calls

    def message(self, text: str) -> AssistantMessage:
        """The whole output's message."""
        reasoning, content = self._reasoning.feed(text, final=True)
        # All reasoning: no content (vLLM's None), where a plain empty output has "".
        message = AssistantMessage(content=self._echo + content or (None if reasoning else ""),
                                   **_reasoning(reasoning))
        parsed = self._req.tool_calls_in(content, self._tool_call_parser)
        if parsed is not None:
            message.content, message.tool_calls = parsed
            self.finish_reason = "tool_calls"
        return message

    def delta(self, text: str, *, final: bool) -> DeltaMessage | None:
        """What the output `text` (cumulative) adds to the stream; None: nothing yet."""
        reasoning, content = self._reasoning.feed(text, final=final)
        delta = DeltaMessage(content=content or None, **_reasoning(reasoning))
        if self.holds:
            delta.content = None
            if final:
                parsed = self._req.tool_calls_in(self._reasoning.content, self._tool_call_parser)
                if parsed is None:
                    delta.content = self._reasoning.content or None
                else:
                    delta.content, calls = parsed
                    delta.tool_calls = [DeltaToolCall(index=i, **call.model_dump())
                                        for i, call in enumerate(calls)]
                    self.finish_reason = "tool_calls"
        if delta.content is None and delta.reasoning is None and not delta.tool_calls:
            return None
        return delta

    @property
    def first_content(self) -> str | None:
        """The content of the stream's first (role) chunk: the echo, unless held back."""
        return None if self.holds else self._echo


def _reasoning(text: str) -> dict[str, str | None]:
    return {"reasoning_content": text or None, "reasoning": text or None}
