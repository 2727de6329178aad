"""A growing output's tool calls as stream deltas: the content before the calls, then per
call (by index) its id and name first, then its arguments in pieces that add up to the
final arguments JSON."""

from __future__ import annotations

import dataclasses

from jaxserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS, call_id


@dataclasses.dataclass(frozen=True)
class CallDelta:
    index: int
    id: str | None  # the call's first delta only, with its name
    name: str | None
    arguments: str


class ToolCallStream:
    def __init__(self, parser: str):
        self._parser = parser
        self._num_content = 0  # characters of content sent
        self._num_arguments: list[int] = []  # per call sent: characters of arguments sent

    @property
    def num_calls(self) -> int:
        return len(self._num_arguments)

    def feed(self, text: str, *, final: bool) -> tuple[str, list[CallDelta]]:
        """(new content, call deltas) of the output `text` (cumulative)."""
        parsed = TOOL_CALL_PARSERS[self._parser](text, final=final)
        if parsed is None:  # not calls: all content, unless calls went out already
            content, calls = ("" if self._num_arguments else text), []
        else:
            content, calls = parsed.content, parsed.calls
        new_content = content[self._num_content:]
        self._num_content = max(self._num_content, len(content))
        deltas = []
        for index, call in enumerate(calls):
            if call.name is None:
                break
            if index == len(self._num_arguments):
                deltas.append(CallDelta(index, call_id(self._parser), call.name, call.arguments))
                self._num_arguments.append(len(call.arguments))
            elif len(call.arguments) > self._num_arguments[index]:
                sent = self._num_arguments[index]
                deltas.append(CallDelta(index, None, None, call.arguments[sent:]))
                self._num_arguments[index] = len(call.arguments)
        return new_content, deltas
