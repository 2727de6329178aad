"""llama3_json (Llama 3.1 / 3.2 JSON tool calls): the whole output is one or more
`{"name", "parameters"}` objects (or "arguments"), separated by ";", maybe after
`<|python_tag|>`; anything else is content."""

from __future__ import annotations

from jaxserve.entrypoints.openai.tool_parsers.base import Parsed, scan_call_object, skip_ws

PYTHON_TAG = "<|python_tag|>"


def parse(text: str, *, final: bool) -> Parsed | None:
    at = skip_ws(text, 0)
    if text.startswith(PYTHON_TAG, at):
        at = skip_ws(text, at + len(PYTHON_TAG))
    elif PYTHON_TAG.startswith(text[at:]) and not final:  # the tag itself may be coming
        return Parsed("", [])
    parsed = Parsed("", [])
    while at < len(text):
        if text[at] != "{":
            return None
        scanned = scan_call_object(text, at, ("parameters", "arguments"))
        if scanned is None:
            return None
        parsed.calls.append(scanned[0])
        if scanned[1] is None:
            break
        at = skip_ws(text, scanned[1])
        if at < len(text) and text[at] == ";":
            at = skip_ws(text, at + 1)
    if final and not (parsed.calls and all(call.done for call in parsed.calls)):
        return None
    return parsed
