"""The auto tool-call parsers (`--tool-call-parser NAME`, vLLM's names), one module each:
`parse(text, *, final) -> Parsed | None` (base.py says what that promises)."""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable

from jaxserve.entrypoints.openai.tool_parsers import hermes, llama3_json, mistral, pythonic
from jaxserve.entrypoints.openai.tool_parsers.base import Parsed, PartialCall

TOOL_CALL_PARSERS: dict[str, Callable[..., Parsed | None]] = {
    "hermes": hermes.parse, "llama3_json": llama3_json.parse, "mistral": mistral.parse,
    "pythonic": pythonic.parse}
# Parsers whose tags are special tokens, which the output text must keep.
KEEP_SPECIAL_TOKENS = frozenset({"mistral"})

__all__ = ["KEEP_SPECIAL_TOKENS", "TOOL_CALL_PARSERS", "Parsed", "PartialCall", "call_id"]


def call_id(parser: str) -> str:
    """A new tool call id: Mistral's templates take 9 letters and digits, others OpenAI's."""
    if parser == "mistral":
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))
    return f"call_{uuid.uuid4().hex[:24]}"
