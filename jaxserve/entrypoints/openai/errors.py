"""OpenAI-style errors: one exception type and the JSON body every failure is sent as.

Handlers raise `APIError(status, message, param=...)`; the server turns it (and aiohttp's
own HTTP errors) into `{"error": {"message", "type", "param", "code"}}`. `from_value_error`
names the parameter of a `SamplingParams` / `LLMEngine` ValueError when it can tell.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus

from aiohttp import web

# The OpenAI `type` of each status this server sends.
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 500: "internal_server_error",
    503: "service_unavailable",
}
# "SamplingParams.top_p must be ...", "prompt_token_ids must be in ...", "logit_bias[7] ...".
_PARAM_PATTERN = re.compile(r"^(?:SamplingParams\.)?([a-z_]+)(?:\[|\s|:)")
_ENGINE_PROMPT_NAMES = ("prompt_token_ids", "prompt")  # what the engine calls the prompt


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def error_body(status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_")
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": code if code is not None else str(status)}}


def sse_error(error: APIError) -> bytes:
    """An error sent in-band after a stream has started."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_value_error(error: ValueError, known_params: set[str] | frozenset[str], *,
                     prompt_param: str = "prompt") -> APIError:
    """A 400 for a ValueError raised by SamplingParams or the engine, naming the parameter
    (the engine's prompt is the request's `prompt_param`)."""
    message = str(error)
    match = _PARAM_PATTERN.match(message)
    param = None
    if match is not None:
        name = match.group(1)
        param = prompt_param if name in _ENGINE_PROMPT_NAMES else (
            name if name in known_params else None)
    return APIError(400, message, param=param)


def from_http_exception(error: web.HTTPException) -> APIError:
    """aiohttp's own errors (unknown route, wrong method, body too large) in OpenAI form."""
    status = error.status
    if status == 413:
        message = f"request body too large: {error.text or 'over the size limit'}"
    elif status == 404:
        message = "no such route"
    elif status == 405:
        message = f"method not allowed: {error.text or ''}".strip()
    else:
        message = error.text or error.reason
    return APIError(status, message)
