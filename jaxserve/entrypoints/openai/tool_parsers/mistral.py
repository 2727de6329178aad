"""mistral: content, then `[TOOL_CALLS]` and the calls, either a JSON array of
`{"name", "arguments"}` objects (v0.3 tokenizers) or `name[ARGS]{...}` per call, each after
its own `[TOOL_CALLS]` (v11 tokenizers). The tags are special tokens: the server keeps
special tokens in the text of requests this parser reads."""

from __future__ import annotations

import re

from jaxserve.entrypoints.openai.tool_parsers.base import (Parsed, PartialCall, normalize,
                                                           scan_call_object, skip_ws,
                                                           undecided, value_end)

START, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[A-Za-z_][\w.-]*")


def parse(text: str, *, final: bool) -> Parsed | None:
    first = text.find(START)
    if first < 0:
        return undecided(text, START, final=final)
    parsed = Parsed(text[:first] if text[:first].strip() else "", [])
    at = skip_ws(text, first + len(START))
    if at < len(text):
        read = _read_array if text[at] == "[" else _read_named
        if not read(text, at, parsed.calls):
            return None
    if final and not (parsed.calls and all(call.done for call in parsed.calls)):
        return None
    return parsed


def _read_array(text: str, at: int, calls: list[PartialCall]) -> bool:
    at += 1
    while (at := skip_ws(text, at)) < len(text):
        if text[at] == "]":
            return True
        if text[at] == ",":
            at += 1
            continue
        scanned = scan_call_object(text, at) if text[at] == "{" else None
        if scanned is None:
            return False
        calls.append(scanned[0])
        if scanned[1] is None:
            return True
        at = scanned[1]
    return True


def _read_named(text: str, at: int, calls: list[PartialCall]) -> bool:
    while at < len(text):
        marker = text.find(ARGS, at)
        if marker < 0:  # the name (or [ARGS]) is still coming
            rest = text[at:].strip()
            rest = next((rest[:-size] for size in range(len(ARGS) - 1, 0, -1)
                         if rest.endswith(ARGS[:size])), rest).strip()
            return not rest or _NAME.fullmatch(rest) is not None
        name = text[at:marker].strip()
        start = skip_ws(text, marker + len(ARGS))
        if _NAME.fullmatch(name) is None or (start < len(text) and text[start] != "{"):
            return False
        end = value_end(text, start) if start < len(text) else None
        calls.append(PartialCall(name, normalize(text[start:end]), end is not None))
        if end is None:
            return True
        at = skip_ws(text, end)
        at = skip_ws(text, at + len(START)) if text.startswith(START, at) else at
    return True
