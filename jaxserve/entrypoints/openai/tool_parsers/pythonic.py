"""pythonic (Llama 3.2 / Llama 4 and others): the whole output is a Python list of calls
with keyword arguments of literal values, `[get_weather(city="Paris"), f(x=1)]`, maybe
between `<|python_start|>` and `<|python_end|>`. A stream gets each call whole (its
arguments as JSON) once it is closed: a call is only known to be one then."""

from __future__ import annotations

import ast
import json
import re
import warnings

from jaxserve.entrypoints.openai.tool_parsers.base import Parsed, PartialCall

START, END = "<|python_start|>", "<|python_end|>"
_UNPARSABLE = (SyntaxError, ValueError, RecursionError, MemoryError)
_CALL_START = re.compile(r"\s*[A-Za-z_]\w*\s*(\(|$)")  # what a call being written starts as


def parse(text: str, *, final: bool) -> Parsed | None:
    body = text.strip().removeprefix(START).removesuffix(END).strip()
    if not body:
        return None if final else Parsed("", [])
    if START.startswith(body) and not final:
        return Parsed("", [])
    if body[0] != "[":
        return None
    if final:
        return _parse_list(body)
    calls, item, depth, quote = [], 1, 0, None
    for at, char in enumerate(body):
        if quote:  # inside a string: only its closing quote matters
            quote = None if char == quote and body[at - 1] != "\\" else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if depth == 1 and char == "," or depth == 0:
            call = _call(body[item:at])
            if call is None:
                return None
            calls.append(call)
            item = at + 1
            if depth == 0:
                break
    else:
        rest = body[item:]
        if rest.strip() and not _CALL_START.match(rest):
            return None
    return Parsed("", calls)


def _parse_list(body: str) -> Parsed | None:
    try:
        tree = _parse(body)
    except _UNPARSABLE:
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = [_from_node(node) for node in tree.elts]
    return None if None in calls else Parsed("", calls)


def _call(source: str) -> PartialCall | None:
    try:
        return _from_node(_parse(source.strip()))
    except _UNPARSABLE:
        return None


def _parse(source: str) -> ast.AST:
    with warnings.catch_warnings():  # model text is no code of ours to warn about
        warnings.simplefilter("ignore", SyntaxWarning)
        return ast.parse(source, mode="eval").body


def _from_node(node: ast.AST) -> PartialCall | None:
    if (not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args
            or any(keyword.arg is None for keyword in node.keywords)):
        return None
    try:
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        return PartialCall(node.func.id, json.dumps(arguments, ensure_ascii=False), True)
    except (*_UNPARSABLE, TypeError):  # not literals, or literals JSON has no form for
        return None
