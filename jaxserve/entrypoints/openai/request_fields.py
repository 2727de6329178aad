"""The request fields this server does not implement, in one place, and the one check of them.

A field of OpenAI's (or vLLM's) request that jaxserve does not implement is *refused*: any
value but null and the values that ask for nothing (`functions=[]`, `best_of` equal to
`n`) is a 400 whose `param` names it, so that no client believes it got what it asked
for. Pure metadata (`METADATA_FIELDS`: who is asking, how OpenAI bills or stores it) is
accepted and ignored. A field in no schema at all (a typo) is ignored with a warning, as
vLLM does. `check_fields` applies the three rules to one request's JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from pydantic_core import PydanticCustomError

logger = logging.getLogger(__name__)

# Accepted and never read: they label the request for OpenAI's own bookkeeping (end user,
# tags, storage, billing tier, abuse tracking, cache routing) and change no output.
METADATA_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier",
                             "prompt_cache_key"})


@dataclasses.dataclass(frozen=True)
class Refused:
    """A field this server does not implement. Null is always accepted, and so are
    `allowed` (values that ask for nothing) and any value `also_accepts(value, request)`
    takes."""

    feature: str  # what sending it asks for, which this server lacks
    allowed: tuple[Any, ...] = ()
    also_accepts: Callable[[Any, Mapping[str, Any]], bool] | None = None
    accepted_text: str = ""  # says what `also_accepts` takes, for the message

    def accepts(self, value: Any, request: Mapping[str, Any]) -> bool:
        if value is None or any(_same(value, allowed) for allowed in self.allowed):
            return True
        return self.also_accepts is not None and self.also_accepts(value, request)

    def message(self, param: str) -> str:
        accepted = ["null", *(json.dumps(a) for a in self.allowed)]
        if self.accepted_text:
            accepted.append(self.accepted_text)
        return (f"{param} is not supported: {self.feature} "
                f"(only {' or '.join(accepted)} is accepted)")


def _same(value: Any, allowed: Any) -> bool:
    """Equal as JSON values: 1 == 1.0, but true is not 1."""
    return value == allowed and isinstance(value, bool) == isinstance(allowed, bool)


def _equals_n(value: Any, request: Mapping[str, Any]) -> bool:
    return _same(value, request.get("n", 1))


_JSON_MODES = ("structured output takes response_format, structured_outputs or guided_json / "
               "_regex / _choice / _grammar; this form is not implemented")

# vLLM's extensions that jaxserve lacks (those it has are fields of the models), and
# best_of, OpenAI's in completions and vLLM's in chat.
_VLLM = MappingProxyType({
    "best_of": Refused("best-of-n is not implemented", also_accepts=_equals_n,
                       accepted_text="the value of n"),
    "use_beam_search": Refused("beam search is not implemented", (False,)),
    "length_penalty": Refused("beam search is not implemented", (1.0,)),
    "truncate_prompt_tokens": Refused("prompts are never truncated; a prompt past the "
                                      "context is a 400"),
    "allowed_token_ids": Refused("restricting the vocabulary is not implemented"),
    "bad_words": Refused("banned words are not implemented", ([],)),
    "guided_whitespace_pattern": Refused(_JSON_MODES),
    "structural_tag": Refused(_JSON_MODES),
    "logits_processors": Refused("custom logits processors are not implemented", ([],)),
    "return_tokens_as_token_ids": Refused("logprob tokens are always text", (False,)),
    "return_token_ids": Refused("responses carry no token ids", (False,)),
    "kv_transfer_params": Refused("disaggregated prefill is not implemented"),
    "vllm_xargs": Refused("there are no extension arguments"),
    "request_id": Refused("the server names every request itself"),
    "mm_processor_kwargs": Refused("only text input is supported"),
})

CHAT_REFUSED: Mapping[str, Refused] = MappingProxyType({
    "functions": Refused("the deprecated function calling is not implemented; send tools",
                         ([],)),
    "function_call": Refused("the deprecated function calling is not implemented; send "
                             "tool_choice", ("none", "auto")),
    "audio": Refused("only text output is supported"),
    "modalities": Refused("only text output is supported", (["text"],)),
    "prediction": Refused("predicted outputs are not implemented"),
    "reasoning_effort": Refused("reasoning effort is not implemented; a template option "
                                "goes in chat_template_kwargs"),
    "verbosity": Refused("verbosity is not implemented"),
    "web_search_options": Refused("web search is not implemented"),
    "moderation": Refused("moderation is not implemented"),
    "prompt_cache_options": Refused("the prefix cache is automatic (LRU); it takes no options"),
    "prompt_cache_retention": Refused("the prefix cache is automatic (LRU); it takes no "
                                      "retention policy"),
    "documents": Refused("documents for RAG templates are not implemented"),
    "thinking_token_budget": Refused("a thinking budget is not implemented"),
    **_VLLM,
})

COMPLETION_REFUSED: Mapping[str, Refused] = MappingProxyType({
    "suffix": Refused("insertion (suffix) is not implemented", ("",)),
    "prompt_embeds": Refused("prompts are text or token ids"),
    **_VLLM,
})

STREAM_OPTIONS_REFUSED: Mapping[str, Refused] = MappingProxyType({
    "include_obfuscation": Refused("stream obfuscation is not implemented", (False,)),
    "continuous_usage_stats": Refused("usage comes once, in the last chunk", (False,)),
})


def check_fields(name: str, data: dict[str, Any], fields: Mapping[str, Any],
                 refused: Mapping[str, Refused], *, param_prefix: str = "",
                 metadata: frozenset[str] = frozenset()) -> None:
    """Raises the `unsupported_field` validation error (its context names the `param`) for
    the first refused field `data` turns on; logs the fields of no schema at all."""
    for field, rule in refused.items():
        if field in data and not rule.accepts(data[field], data):
            param = param_prefix + field
            raise PydanticCustomError("unsupported_field", "{message}",
                                      {"param": param, "message": rule.message(param)})
    unknown = sorted(set(data) - set(fields) - set(refused) - metadata)
    if unknown:
        logger.warning("%s: ignoring unknown fields %s", name, unknown)
