"""What a request's reader can get instead of outputs, and what the server answers for it.

`EngineDeadError`: the engine is not running (crashed, hung, shut down): a new request is
refused (503). `RequestFailedError`: this one request failed inside the engine (its
detokenization raised, say) and was dropped; others go on (500). `EngineFailedRequestError`:
both, for a request that was in the engine when it died (500 for it, 503 for later ones).
`RequestAbortedError`: aborted while someone still read it.
"""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine thread is gone (crashed, hung or shut down); no request can be served."""


class RequestFailedError(RuntimeError):
    """This request failed inside the engine and was dropped; the engine goes on."""


class EngineFailedRequestError(EngineDeadError, RequestFailedError):
    """The engine died (a step raised or hung) while this request was in it."""


class RequestAbortedError(RuntimeError):
    """The request was aborted while someone was still reading its outputs."""
