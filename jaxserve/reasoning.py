"""Reasoning parsers (vLLM's `--reasoning-parser`): a model's think block split from its answer.

`deepseek_r1`: the text up to `</think>` is reasoning, whether or not the output opens with
`<think>` (R1's newer templates open it in the prompt); without `</think>` all of it is.
`qwen3`: only the text inside `<think>...</think>` is (a block cut short runs to the end);
the text around it is the answer. A prompt that ends with the end tag (Qwen3's template
under `enable_thinking=False`) leaves nothing to reason: the whole output is the answer.
`ReasoningStream` splits a growing output, holding back a tail that may be a tag's start,
so that its deltas add up to the split of the final text. The engine starts a request's
grammar after `end` (structured output applies to the answer only).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ReasoningParser:
    name: str
    opened: bool  # the output starts inside the think block, start tag or not
    start: str = "<think>"
    end: str = "</think>"

    def ended_in(self, prompt: str) -> bool:
        """Whether the prompt closes the think block itself (the output is all answer)."""
        return prompt.rstrip().endswith(self.end)

    def split(self, text: str, *, final: bool = True) -> tuple[str, str]:
        """(reasoning, content) of an output; not `final`: a growing output's, without any
        tail that may still become a tag."""
        before = ""
        if self.opened:
            stripped = text.lstrip()
            if stripped.startswith(self.start):  # a start tag the template did not write
                body = stripped[len(self.start):]
            elif not final and self.start.startswith(stripped):
                return "", ""
            else:
                body = text
        else:
            at = text.find(self.start)
            if at < 0:
                return "", text if final else _hold(text, self.start)
            before, body = text[:at], text[at + len(self.start):]
        at = body.find(self.end)
        if at < 0:
            return (body if final else _hold(body, self.end)), before
        return body[:at], before + body[at + len(self.end):]


REASONING_PARSERS = {parser.name: parser for parser in (
    ReasoningParser("deepseek_r1", opened=True),
    ReasoningParser("qwen3", opened=False),
)}


def get_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"reasoning_parser must be one of {sorted(REASONING_PARSERS)}, got "
                         f"{name!r}") from None


class ReasoningStream:
    """The reasoning and content deltas of one growing output."""

    def __init__(self, parser: ReasoningParser | None, *, ended_in_prompt: bool = False):
        self._parser = None if ended_in_prompt else parser
        self._num_reasoning = 0  # characters of the reasoning sent so far
        self.content = ""  # the answer so far: what the tool-call parser reads

    def feed(self, text: str, *, final: bool) -> tuple[str, str]:
        """(new reasoning, new content) of the output `text` (cumulative)."""
        if self._parser is None:
            reasoning, content = "", text
        else:
            reasoning, content = self._parser.split(text, final=final)
        new = reasoning[self._num_reasoning:], content[len(self.content):]
        self._num_reasoning = max(self._num_reasoning, len(reasoning))
        self.content += new[1]
        return new


def _hold(text: str, tag: str) -> str:
    """`text` without a tail that is the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return text[:-size]
    return text
