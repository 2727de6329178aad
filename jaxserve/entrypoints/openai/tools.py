"""Tool calling in chat: the `tools`, `tool_choice` and `parallel_tool_calls` fields, the
grammar that forces a call, and the `tool_calls` the output becomes.

`tools` (OpenAI function tools) always reach the chat template, whatever `tool_choice`
says (as vLLM does). `tool_choice="required"` or a named function is enforced by the
grammar engine, as vLLM does: the output must be JSON matching a schema built from the
tools (`forced_schema`), and `parse_tool_calls` turns it into the message's `tool_calls`.
For a named function the output is its arguments object; for "required" it is an array
(one item when `parallel_tool_calls` is false) of `{"name", "arguments"}` objects, one of
the tools each; a stream sends them whole, when the JSON is done. `"none"` generates plain
text, and so does `"auto"`, whose output the server's auto parser (--tool-call-parser NAME,
with --enable-auto-tool-choice; tool_parsers/) reads for calls when it has one.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_serializer

from jaxserve.entrypoints.openai.structured_fields import StructuredOutputFields
from jaxserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS, call_id
from jaxserve.sampling_params import StructuredOutputsParams

AUTO_TOOL_CALL_PARSERS = tuple(TOOL_CALL_PARSERS)  # the --tool-call-parser choices
# What a function without `parameters` takes: no arguments (OpenAI's reading).
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")  # `strict` and the like reach the template
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _WithoutNones(BaseModel):
    """Sent without its unset (None) fields: the openai SDK's stream accumulator would
    otherwise overwrite a call's `type` with null."""

    @model_serializer(mode="wrap")
    def _without_nones(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(_WithoutNones):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_WithoutNones):
    """A piece of a tool call in a stream: its first carries the id and name, the others
    (same index) more of the arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ToolFields(StructuredOutputFields):
    """Mixed into the chat request; a forced tool call is structured output, the one form
    the request may take."""

    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template takes them, or None without tools."""
        if not self.tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def forced_tool(self) -> str | None:
        """'required', the name of the function tool_choice names, or None (plain text);
        ValueError naming tool_choice for a choice the tools cannot meet."""
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return None
        names = [tool.function.name for tool in self.tools or ()]
        if not names:
            raise ValueError(f"tool_choice {_show(choice)} needs tools")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise ValueError(f"tool_choice names the function {choice.function.name!r}, "
                                 f"which is not one of the tools {names}")
            return choice.function.name
        return "required"

    def forced_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must match to be the forced tool call(s), or None."""
        forced = self.forced_tool()
        if forced is None:
            return None
        functions = {tool.function.name: tool.function for tool in self.tools}
        if forced != "required":
            return _parameters(functions[forced])
        calls = [{"type": "object", "additionalProperties": False,
                  "required": ["name", "arguments"],
                  "properties": {"name": {"const": name}, "arguments": _parameters(function)}}
                 for name, function in functions.items()]
        schema = {"type": "array", "minItems": 1,
                  "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if self.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return schema

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The forced tool call's schema, if any (which leaves no room for another form),
        else the form the structured-output fields ask for."""
        structured = super().structured_outputs_params()
        schema = self.forced_schema()
        if schema is None:
            return structured
        if structured is not None:
            raise ValueError("tool_choice: a forced tool call is structured output already; "
                             "it takes no response_format, structured_outputs or guided_*")
        # Compact JSON: whitespace would only delay the call (the arguments are re-serialized).
        return StructuredOutputsParams(json=schema, disable_any_whitespace=True)

    def holds_output(self) -> bool:
        """Whether the output is a forced tool call, which a stream sends whole at the end."""
        return self.forced_tool() is not None

    def tool_calls_in(self, text: str, auto_parser: str | None,
                      ) -> tuple[str | None, list[ToolCall]] | None:
        """(content, tool calls) when the output holds calls, else None (plain content).
        `auto_parser` (--tool-call-parser, with --enable-auto-tool-choice) reads the
        calls of an unforced output when tools are offered."""
        if self.auto_parses(auto_parser):
            parsed = TOOL_CALL_PARSERS[auto_parser](text, final=True)
            if parsed is None:
                return None
            return parsed.content or None, [ToolCall(id=call_id(auto_parser), function=(
                FunctionCall(name=call.name, arguments=call.arguments))) for call in parsed.calls]
        calls = self.parse_tool_calls(text)
        return None if calls is None else (None, calls)

    def auto_parses(self, auto_parser: str | None) -> bool:
        """Whether the auto parser reads this request's output (tools, no forced call)."""
        return bool(auto_parser and self.tools and self.tool_choice in (None, "auto"))

    def parse_tool_calls(self, text: str) -> list[ToolCall] | None:
        """The tool calls a forced output holds; None when none is forced or the text is
        not the complete JSON (cut short by max_tokens or a stop string)."""
        forced = self.forced_tool()
        if forced is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if forced != "required":
            calls = [(forced, value)]
        elif isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
            calls = [(v["name"], v.get("arguments", {})) for v in value]
        else:
            return None
        return [_call(name, arguments) for name, arguments in calls]


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool calls with their arguments as objects, as templates
    (and transformers) take them; the request carries them as JSON text."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except json.JSONDecodeError:
                raise ValueError("messages: a tool call's function.arguments must be a JSON "
                                 f"object, got {function['arguments']!r}") from None
            call = {**call, "function": {**function, "arguments": arguments}}
        parsed.append(call)
    return {**message, "tool_calls": parsed}


def _call(name: str, arguments: Any) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                    function=FunctionCall(name=name, arguments=json.dumps(arguments)))


def _parameters(function: FunctionDefinition) -> dict[str, Any]:
    return function.parameters if function.parameters is not None else dict(_NO_PARAMETERS)


def _show(choice: Any) -> str:
    return json.dumps(choice.model_dump() if isinstance(choice, BaseModel) else choice)
