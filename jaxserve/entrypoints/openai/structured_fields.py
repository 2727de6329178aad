"""The request fields that ask for structured output, in every form vLLM accepts, and the
`StructuredOutputsParams` they become.

- OpenAI's `response_format`: `{"type": "text"}` (nothing), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- vLLM's `structured_outputs`: `{"json" | "regex" | "choice" | "grammar" | "json_object",
  "disable_any_whitespace"}`;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (and
  `guided_decoding_backend`, read and ignored: llguidance serves every form).

At most one form per request; two, or a malformed one, is a ValueError naming the field
(the server's 400). An invalid schema, regex or grammar is the engine's ValueError, with the
grammar compiler's message, also a 400.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from jaxserve.sampling_params import StructuredOutputsParams

# vLLM's backend names: llguidance serves what each would.
_BACKENDS = ("auto", "guidance", "llguidance", "xgrammar", "outlines", "lm-format-enforcer")
_SO_KEYS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")


class StructuredOutputFields(BaseModel):
    """Mixed into the completion and chat requests."""

    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # a vLLM backend name; llguidance serves all

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The one structured-output form this request asks for, or None."""
        backend = self.guided_decoding_backend
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"guided_decoding_backend must be one of {_BACKENDS}, got "
                             f"{backend!r}")
        guided = (("guided_json", "json", self.guided_json),
                  ("guided_regex", "regex", self.guided_regex),
                  ("guided_choice", "choice", self.guided_choice),
                  ("guided_grammar", "grammar", self.guided_grammar))
        forms = {name: params for name, params in (
            ("response_format", _from_response_format(self.response_format)),
            ("structured_outputs", _from_structured_outputs(self.structured_outputs)),
            *((name, StructuredOutputsParams(**{key: value}))
              for name, key, value in guided if value is not None),
        ) if params is not None}
        if len(forms) > 1:
            raise ValueError(f"{sorted(forms)[1]}: only one structured output form per "
                             f"request, got {sorted(forms)}")
        return next(iter(forms.values()), None)


def _from_response_format(value: dict[str, Any] | None) -> StructuredOutputsParams | None:
    kind = None if value is None else value.get("type")
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format.json_schema.schema: a JSON schema object is "
                             "required")
        return StructuredOutputsParams(json=spec["schema"])
    raise ValueError(f"response_format.type must be one of 'text', 'json_object', "
                     f"'json_schema', got {kind!r}")


def _from_structured_outputs(value: dict[str, Any] | None) -> StructuredOutputsParams | None:
    if value is None:
        return None
    unknown = sorted(set(value) - set(_SO_KEYS))
    if unknown:
        raise ValueError(f"structured_outputs: unknown keys {unknown}; known: {list(_SO_KEYS)}")
    return StructuredOutputsParams(**value)
