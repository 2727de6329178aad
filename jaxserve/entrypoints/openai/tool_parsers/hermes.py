"""hermes (Qwen2.5, Qwen3, NousResearch Hermes): `<tool_call>{"name", "arguments"}</tool_call>`
blocks after the content; the last may be cut short of its end tag."""

from __future__ import annotations

from jaxserve.entrypoints.openai.tool_parsers.base import (Parsed, scan_call_object, skip_ws,
                                                           undecided)

START, END = "<tool_call>", "</tool_call>"


def parse(text: str, *, final: bool) -> Parsed | None:
    first = text.find(START)
    if first < 0:
        return undecided(text, START, final=final)
    parsed, at = Parsed(text[:first] if text[:first].strip() else "", []), first
    while text.startswith(START, at):
        at = skip_ws(text, at + len(START))
        if at >= len(text):
            break
        if text[at] != "{":
            return None
        scanned = scan_call_object(text, at)
        if scanned is None:
            return None
        parsed.calls.append(scanned[0])
        if scanned[1] is None:
            break
        at = skip_ws(text, scanned[1])
        at = skip_ws(text, at + len(END)) if text.startswith(END, at) else at
    if final and not (parsed.calls and all(call.done for call in parsed.calls)):
        return None
    return parsed
