"""GET /dashboard: a live page of the engine at work, and its event stream.

The page is static package data (static/dashboard/: HTML, script, styles and the vendored
uPlot build), so it works offline and holds no data; with `--api-key` it asks for the key
and keeps it in the browser's sessionStorage. `GET /dashboard/events` is a server-sent
event stream, gated by the key like the API (a header, or the `api_key` query parameter,
which is all an EventSource can send): first the last minutes as one `history` event, then
a `summary` each second: `engine/stats_summary.summarize` over the engine's step records,
the KV pool's block map and counts read live, and TTFT / TPOT percentiles of the last
minute (a `LatencyWindow`, fed by the AsyncEngine as one of its observers).
"""

from __future__ import annotations

import asyncio
import collections
import json
import pathlib
import time

import numpy as np
from aiohttp import web

from jaxserve.core.block_pool import CACHED, FREE, SHARED, USED
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.stats_summary import per_second, summarize

STATIC_DIR = pathlib.Path(__file__).parent / "static" / "dashboard"
PAGE_PATH, EVENTS_PATH, STATIC_PATH = "/dashboard", "/dashboard/events", "/dashboard/static"
KEY_PARAM = "api_key"  # the key on the event stream's URL
MAX_MAP_CELLS = 4096  # a larger pool is drawn with each cell the busiest of its blocks
HISTORY_SECONDS = 300  # sent when a page connects
LATENCY_SECONDS = 60.0  # the window of the TTFT / TPOT percentiles
PERCENTILES = (50, 90, 99)
# A second is summarized this long after it ends: its last step is recorded by then.
SETTLE_SECONDS = 0.05


def is_open_path(path: str) -> bool:
    """The page and its static files hold no data: they load without the key."""
    return path == PAGE_PATH or path.startswith(STATIC_PATH + "/")


def query_authorization(request: web.Request) -> str:
    """"Bearer <key>" from the event stream's URL (an EventSource sends no headers); ""
    elsewhere or without the parameter."""
    key = request.query.get(KEY_PARAM) if request.path == EVENTS_PATH else None
    return "" if key is None else f"Bearer {key}"


class LatencyWindow:
    """TTFT and inter-token latencies (TPOT) of the last minute; an EngineObserver.
    Appends on the engine thread, copies on the event loop's: no lock needed."""

    def __init__(self, seconds: float = LATENCY_SECONDS, maxlen: int = 65536):
        self.seconds = seconds
        self._ttft: collections.deque[tuple[float, float]] = collections.deque(maxlen=maxlen)
        self._tpot: collections.deque[tuple[float, float]] = collections.deque(maxlen=maxlen)

    def on_first_token(self, seconds: float) -> None:
        self._ttft.append((time.monotonic(), seconds))

    def on_inter_token(self, seconds: float) -> None:
        self._tpot.append((time.monotonic(), seconds))

    def on_request_done(self, seconds: float, finish_reasons: list[str]) -> None:
        pass

    def percentiles(self) -> dict:
        """{"ttft": {"p50": ms, ...}, "tpot": {...}}; None where nothing was seen."""
        since = time.monotonic() - self.seconds
        return {name: _percentiles_ms([v for t, v in tuple(samples) if t >= since])
                for name, samples in (("ttft", self._ttft), ("tpot", self._tpot))}


class ObserverGroup:
    """Several EngineObservers as one (the AsyncEngine calls one)."""

    def __init__(self, *observers):
        self.observers = observers

    def on_first_token(self, seconds: float) -> None:
        for observer in self.observers:
            observer.on_first_token(seconds)

    def on_inter_token(self, seconds: float) -> None:
        for observer in self.observers:
            observer.on_inter_token(seconds)

    def on_request_done(self, seconds: float, finish_reasons: list[str]) -> None:
        for observer in self.observers:
            observer.on_request_done(seconds, finish_reasons)


class Dashboard:
    """The event stream's data, read from the engine (its `step_stats` and
    `block_states()`) and the latency window."""

    def __init__(self, engine: AsyncEngine):
        self.async_engine = engine
        self.engine = engine.engine  # the LLMEngine the AsyncEngine's thread steps
        self.latencies = LatencyWindow()
        self.closing = asyncio.Event()  # set on server shutdown: streams end
        # (second, encoded event): pages open at once share each second's summary, so the
        # block map's O(L) read happens once a second however many watch
        self._latest: tuple[int, bytes] | None = None

    def history(self, end: int) -> dict:
        """Each whole second up to `end` since the oldest step kept (at most 5 minutes)."""
        records = self.engine.step_stats.records()
        seconds = 0 if not records else min(HISTORY_SECONDS, int(end - records[0].time) + 1)
        return {"type": "history", "summaries": per_second(records, end, seconds)}

    def summary_event(self, end: int) -> bytes:
        """`summary(end)` as an event, made once for every page."""
        if self._latest is None or self._latest[0] != end:
            self._latest = (end, _event(self.summary(end)))
        return self._latest[1]

    def summary(self, end: float) -> dict:
        """The second before `end` from the step records; the pool, the latencies and the
        request counts as they are now."""
        summary = summarize(self.engine.step_stats.records(), end - 1, end)
        states = np.frombuffer(bytes(self.engine.block_states()), np.uint8)  # [L - 1]
        counts = np.bincount(states, minlength=4)
        summary["kv"] = {"num_blocks": len(states), "used": int(counts[USED] + counts[SHARED]),
                         "cached": int(counts[CACHED]), "free": int(counts[FREE]),
                         "shared": int(counts[SHARED])}
        summary["block_map"] = block_map(states)
        summary["latency_ms"] = self.latencies.percentiles()
        # the engine thread's latest numbers: also those of warm-up, before any step
        stats = self.async_engine.stats
        summary["compilations"] = int(stats.get("num_compilations", summary["compilations"]))
        summary["requests"]["running"] = int(stats.get("num_running", 0))
        summary["requests"]["waiting"] = int(stats.get("num_waiting", 0))
        summary["type"] = "summary"
        return summary


def block_map(states: np.ndarray) -> dict:
    """[L - 1] block states -> at most MAX_MAP_CELLS cells, one digit each (FREE..SHARED);
    a cell stands for `blocks_per_cell` consecutive blocks and shows the busiest."""
    per_cell = max(1, -(-len(states) // MAX_MAP_CELLS))
    padded = np.zeros(-(-len(states) // per_cell) * per_cell, np.uint8)
    padded[:len(states)] = states
    cells = padded.reshape(-1, per_cell).max(axis=1) if len(padded) else padded
    return {"blocks_per_cell": per_cell, "cells": (cells + ord("0")).tobytes().decode()}


def add_dashboard(app: web.Application, engine: AsyncEngine) -> Dashboard:
    """Adds the page, its static files and the event stream to `app`."""
    dashboard = Dashboard(engine)

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        # Windows are whole seconds of the clock, each sent once it is over: they tile
        # time, so every step is counted once, and every page gets the same ones.
        sent = int(time.time())  # the end of the last second sent
        await response.write(_event(dashboard.history(sent)))
        while True:
            wait = sent + 1 + SETTLE_SECONDS - time.time()
            try:
                await asyncio.wait_for(dashboard.closing.wait(), max(0.0, wait))
                return response
            except asyncio.TimeoutError:
                pass
            for end in range(sent + 1, int(time.time() - SETTLE_SECONDS) + 1):
                await response.write(dashboard.summary_event(end))
                sent = end

    async def close_streams(app: web.Application) -> None:
        dashboard.closing.set()

    app.router.add_get(PAGE_PATH, page)
    app.router.add_get(EVENTS_PATH, events)
    app.router.add_static(STATIC_PATH, STATIC_DIR)
    app.on_shutdown.append(close_streams)
    return dashboard


def _event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _percentiles_ms(values: list[float]) -> dict:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    found = np.percentile(np.asarray(values), PERCENTILES) * 1000
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, found)}
