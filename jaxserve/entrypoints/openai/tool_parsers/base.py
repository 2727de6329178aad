"""What every tool-call parser returns, and the JSON scanning the JSON formats share.

A parser reads an output, whole (`final`) or still growing, as `Parsed`: the content before
the calls and each call so far (name once known, arguments JSON so far). A growing output's
parse only ever extends the previous one, so a stream can send the differences. `None`
means the output is not tool calls (or is malformed): it is all content. Arguments are the
model's own JSON text with the whitespace outside strings set as `json.dumps` sets it, so
that the streamed pieces add up to the final arguments exactly.
"""

from __future__ import annotations

import dataclasses
import json

_WS = " \t\n\r"


@dataclasses.dataclass
class PartialCall:
    name: str | None  # None until the name is complete
    arguments: str  # the arguments JSON so far ("" before they start)
    done: bool = False  # the call is complete


@dataclasses.dataclass
class Parsed:
    content: str  # the output's text before the calls (a prefix of it; "" if blank)
    calls: list[PartialCall]


def undecided(text: str, tag: str, *, final: bool) -> Parsed | None:
    """No call has begun: plain content when `final`, else the text without a tail that
    may be the start of `tag` (nothing while it is blank: it may precede a call)."""
    if final:
        return None
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            text = text[:-size]
            break
    return Parsed(text if text.strip() else "", [])


def skip_ws(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WS:
        at += 1
    return at


def string_end(text: str, at: int) -> int | None:
    """The index after the JSON string that starts at `at`; None if it is not closed yet."""
    at += 1
    while at < len(text):
        if text[at] == "\\":
            at += 2
        elif text[at] == '"':
            return at + 1
        else:
            at += 1
    return None


def value_end(text: str, at: int) -> int | None:
    """The index after the JSON value that starts at `at`; None if it may go on."""
    if text[at] == '"':
        return string_end(text, at)
    if text[at] in "{[":
        depth = 0
        while at < len(text):
            if text[at] == '"':
                end = string_end(text, at)
                if end is None:
                    return None
                at = end
                continue
            depth += (text[at] in "{[") - (text[at] in "}]")
            at += 1
            if depth == 0:
                return at
        return None
    end = at
    while end < len(text) and text[end] not in ",}]" + _WS:
        end += 1
    return None if end == len(text) else end


def normalize(raw: str) -> str:
    """JSON text (or a prefix of it) with json.dumps' whitespace: ", " and ": " outside
    strings, nothing else; a longer prefix gives a longer result."""
    out, in_string, escaped = [], False, False
    for char in raw:
        if in_string:
            in_string = escaped or char != '"'
            escaped = not escaped and char == "\\"
            out.append(char)
        elif char in _WS:
            continue
        else:
            in_string = char == '"'
            out.append(char + " " if char in ",:" else char)
    return "".join(out)


def scan_call_object(text: str, at: int, args_keys: tuple[str, ...] = ("arguments",),
                     ) -> tuple[PartialCall, int | None] | None:
    """The call `{"name": ..., "<args key>": {...}}` starting at `text[at] == "{"`: (the call
    so far, the index after its closing brace or None); None if it is malformed."""
    call, at = PartialCall(None, ""), at + 1
    has_args = False
    while True:
        at = skip_ws(text, at)
        if at >= len(text):
            return call, None
        if text[at] == "}":
            if call.name is None:
                return None
            call.arguments, call.done = call.arguments if has_args else "{}", True
            return call, at + 1
        if text[at] == ",":
            at += 1
            continue
        if text[at] != '"':
            return None
        key_end = string_end(text, at)
        colon = len(text) if key_end is None else skip_ws(text, key_end)
        start = skip_ws(text, colon + 1)
        if start >= len(text):
            return call, None
        if text[colon] != ":":
            return None
        try:
            key = json.loads(text[at:key_end])
        except json.JSONDecodeError:
            return None
        end = value_end(text, start)
        if key in args_keys and not has_args:
            if text[start] != "{":
                return None
            call.arguments, has_args = normalize(text[start:end]), True
        if end is None:
            return call, None
        try:
            value = json.loads(text[start:end])
        except (json.JSONDecodeError, RecursionError):
            return None
        if key == "name":
            if not isinstance(value, str) or not value:
                return None
            call.name = value
        at = end
