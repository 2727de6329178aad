"""The aiohttp app of the OpenAI-compatible server, and how it runs until SIGTERM.

`build_app(async_engine, ...)` wires the routes (completions, chat, models, health, metrics,
tokenize, detokenize, version, the dashboard) and one middleware for the API key and for
OpenAI-style error bodies; it works in-process for tests. `serve_http` listens, logs the
URL once ready, and on SIGTERM/SIGINT stops accepting, lets in-flight requests finish for a
grace period, cancels (and so aborts) the rest, and returns. If the engine dies (a step
raised or hung), it gives error answers `death_grace` seconds to go out (/health says 503
meanwhile), shuts down the same way and returns 1: the process exits non-zero for a
supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from jaxserve import __version__
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.errors import EngineDeadError, RequestAbortedError, RequestFailedError
from jaxserve.entrypoints.openai import dashboard
from jaxserve.entrypoints.openai.errors import APIError, from_http_exception
from jaxserve.entrypoints.openai.metrics import ServerMetrics
from jaxserve.entrypoints.openai.openapi import openapi_document
from jaxserve.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest
from jaxserve.entrypoints.openai.serving_chat import create_chat_completion, render_chat
from jaxserve.entrypoints.openai.serving_common import (ServerState, decode_ids, encode_text,
                                                        parse_body)
from jaxserve.entrypoints.openai.serving_completion import create_completion
from jaxserve.reasoning import get_reasoning_parser

logger = logging.getLogger(__name__)

STATE = web.AppKey("state", ServerState)
METRICS = web.AppKey("metrics", ServerMetrics)
DEFAULT_MAX_BODY_BYTES = 10 * 2**20
# Routes open without the API key (probes and scrapers), as in vLLM.
_OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json"})


def build_app(engine: AsyncEngine, *, served_model_names: list[str] | tuple[str, ...],
              model_root: str | None = None, api_key: str | None = None,
              chat_template: str | None = None, trust_request_chat_template: bool = False,
              max_logprobs: int = 20, tool_call_parser: str | None = None,
              reasoning_parser: str | None = None,
              max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              enable_dashboard: bool = True) -> web.Application:
    """The server app; sets the engine's observer to the app's metrics."""
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    state = ServerState(engine=engine, served_model_names=tuple(served_model_names),
                        model_root=model_root or served_model_names[0],
                        max_logprobs=max_logprobs, chat_template=chat_template,
                        trust_request_chat_template=trust_request_chat_template,
                        tool_call_parser=tool_call_parser,
                        reasoning_parser=reasoning_parser and get_reasoning_parser(
                            reasoning_parser))
    metrics = ServerMetrics(lambda: {**engine.stats, **engine.compilation_stats()},
                            served_model_names[0])
    engine.observer = metrics
    app = web.Application(middlewares=[_error_middleware(api_key)],
                          client_max_size=max_request_body_bytes)
    app[STATE], app[METRICS] = state, metrics

    def route(handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            return await handler(state, request)
        return wrapped

    app.router.add_post("/v1/completions", route(create_completion))
    app.router.add_post("/v1/chat/completions", route(create_chat_completion))
    app.router.add_get("/v1/models", route(_models))
    app.router.add_get("/health", route(_health))
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/tokenize", route(_tokenize))
    app.router.add_post("/detokenize", route(_detokenize))
    app.router.add_get("/version", _version)
    # built once: the models and limits do not change
    document = openapi_document(__version__, max_n=state.max_n, max_logprobs=max_logprobs)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/openapi.json", openapi)
    if enable_dashboard:  # GET /dashboard and its event stream; one more observer
        engine.observer = dashboard.ObserverGroup(
            metrics, dashboard.add_dashboard(app, engine).latencies)
    return app


def _error_middleware(api_key: str | None):
    expected = None if api_key is None else f"Bearer {api_key}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        try:
            if expected is not None and not (request.path in _OPEN_PATHS
                                             or dashboard.is_open_path(request.path)):
                given = (request.headers.get("Authorization")
                         or dashboard.query_authorization(request)).encode()
                if not hmac.compare_digest(given, expected):
                    raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                   code="invalid_api_key")
            return await handler(request)
        except APIError as error:
            return error.response()
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return from_http_exception(error).response()
        except RequestFailedError as error:  # lost in the engine (and maybe the engine too)
            return APIError(500, str(error)).response()
        except (EngineDeadError, RequestAbortedError) as error:
            return APIError(503, str(error)).response()
        except ConnectionResetError:
            raise
        except Exception as error:  # noqa: BLE001 - a bug must not take the server down
            logger.exception("unhandled error in %s %s", request.method, request.path)
            return APIError(500, f"internal error: {type(error).__name__}: {error}").response()

    return middleware


async def _models(state: ServerState, request: web.Request) -> web.Response:
    created = int(time.time())
    data = [{"id": name, "object": "model", "created": created, "owned_by": "jaxserve",
             "root": state.model_root, "parent": None, "max_model_len": state.max_model_len,
             "permission": []} for name in state.served_model_names]
    return web.json_response({"object": "list", "data": data})


async def _health(state: ServerState, request: web.Request) -> web.Response:
    if not state.engine.is_alive:
        return APIError(503, f"the engine is not running: {state.engine.dead_error}").response()
    return web.Response(status=200, text="")  # text/plain, as /openapi.json says


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def _tokenize(state: ServerState, request: web.Request) -> web.Response:
    req = await parse_body(request, TokenizeRequest)
    state.check_model(req.model)
    if state.tokenizer is None:
        raise APIError(400, "the server runs without a tokenizer")
    if req.messages is not None:
        _, ids = render_chat(state, req.messages, add_generation_prompt=req.add_generation_prompt,
                             continue_final_message=req.continue_final_message,
                             chat_template=req.chat_template,
                             chat_template_kwargs=req.chat_template_kwargs,
                             add_special_tokens=req.add_special_tokens,
                             tools=[tool.model_dump(exclude_none=True) for tool in req.tools]
                             if req.tools else None)
    else:
        ids = encode_text(state, req.prompt, add_special_tokens=req.add_special_tokens,
                          param="prompt")
    return web.json_response({"count": len(ids), "max_model_len": state.max_model_len,
                              "tokens": ids})


async def _detokenize(state: ServerState, request: web.Request) -> web.Response:
    req = await parse_body(request, DetokenizeRequest)
    state.check_model(req.model)
    if state.tokenizer is None:
        raise APIError(400, "the server runs without a tokenizer")
    vocab = state.engine.model_config.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens must be in [0, {vocab}), got {bad[0]}", param="tokens")
    return web.json_response({"prompt": decode_ids(state, req.tokens, param="tokens")})


def make_runner(app: web.Application, *, shutdown_timeout: float) -> web.AppRunner:
    """A runner whose handlers are cancelled when their client disconnects (which aborts
    the request) and which waits `shutdown_timeout` seconds for in-flight ones on cleanup."""
    return web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout,
                         access_log=None)


async def serve_http(app: web.Application, host: str, port: int, *,
                     shutdown_timeout: float = 10.0, stop: asyncio.Event | None = None,
                     death_grace: float = 2.0) -> int:
    """Serves until SIGTERM/SIGINT (or `stop` is set), then shuts down gracefully: returns
    0; or until the engine dies: returns 1."""
    runner = make_runner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    engine, died = app[STATE].engine, asyncio.Event()

    def on_death(error: BaseException) -> None:  # any thread
        try:
            loop.call_soon_threadsafe(died.set)
        except RuntimeError:  # the loop is closed: serving is over anyway
            pass

    engine.on_death.append(on_death)
    if not engine.is_alive:
        died.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1] if runner.addresses else port
        state = app[STATE]
        programs = state.engine.compilation_stats()
        logger.info("jaxserve is ready: serving %s at http://%s:%d/v1 (max_model_len=%d; "
                    "%d programs compiled, %d compiling in the background)",
                    state.served_model_names[0], host, bound_port, state.max_model_len,
                    programs["num_programs_compiled"], programs["num_programs_pending"])
        waits = [asyncio.ensure_future(event.wait()) for event in (stop, died)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waits:
            waiter.cancel()
        if died.is_set():
            logger.error("the engine died (%s): the server exits with status 1 in %.0f s; a "
                         "supervisor should restart it", engine.dead_error, death_grace)
            await asyncio.sleep(death_grace)
        else:
            logger.info("shutting down: no new requests; in-flight ones get %.0f s to finish",
                        shutdown_timeout)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        engine.on_death.remove(on_death)
    return 1 if died.is_set() else 0
