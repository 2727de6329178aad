"""GET /dashboard and its event stream: the files served, the API key's rules,
--disable-dashboard, prompt closing on shutdown, and every event valid against the
published schema (static/dashboard/events.schema.json), from the scripted engine and from
the real one. The page itself runs in Chromium in test_dashboard_browser.py."""

import asyncio
import json
import re
import socket
import time
import urllib.request

import aiohttp
import jsonschema
import pytest

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.entrypoints.openai.api_server import build_app, serve_http
from jaxserve.entrypoints.openai.dashboard import STATIC_DIR, ObserverGroup
from jaxserve.entrypoints.openai.metrics import ServerMetrics

VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((STATIC_DIR / "events.schema.json").read_text()))


async def read_events(response, count: int) -> list[dict]:
    """The first `count` events of an open event stream, each checked against the schema."""
    events = []
    while len(events) < count:
        line = await response.content.readline()
        assert line, "the event stream ended"
        if line.startswith(b"data: "):
            event = json.loads(line[len(b"data: "):])
            VALIDATOR.validate(event)
            events.append(event)
    return events


def test_the_page_and_every_file_it_loads_are_served(scripted):
    async def test(client, engine):
        page = await client.get("/dashboard")
        html = await page.text()
        files = re.findall(r'(?:src|href)="(dashboard/static/[^"]+)"', html)
        statuses = {path: (await client.get("/" + path)).status for path in files}
        license_text = await (await client.get("/dashboard/static/vendor/uPlot.LICENSE")).text()
        return page.status, page.content_type, files, statuses, license_text

    status, content_type, files, statuses, license_text = scripted.serve(test)
    assert status == 200 and content_type == "text/html"
    assert {"dashboard/static/dashboard.js", "dashboard/static/vendor/uPlot.iife.min.js"} <= set(files)
    assert all(s == 200 for s in statuses.values()), statuses
    assert "MIT License" in license_text


def test_the_stream_sends_the_history_then_a_summary_each_second(scripted):
    async def test(client, engine):
        response = await client.get("/dashboard/events")
        start = time.monotonic()
        events = await read_events(response, 2)
        return response.status, response.content_type, events, time.monotonic() - start

    status, content_type, (history, summary), seconds = scripted.serve(test)
    assert status == 200 and content_type == "text/event-stream"
    assert history == {"type": "history", "summaries": []}  # no step yet
    assert summary["type"] == "summary" and seconds < 3
    assert summary["time"] == int(summary["time"]) and summary["seconds"] == 1
    assert summary["block_map"] == {"blocks_per_cell": 1, "cells": "0" * 8}
    assert summary["kv"] == {"num_blocks": 8, "used": 0, "cached": 0, "free": 8, "shared": 0}


def test_with_an_api_key_the_stream_needs_it_and_the_page_does_not(scripted):
    async def test(client, engine):
        statuses = {}
        for name, path, headers in [
                ("page", "/dashboard", {}),
                ("script", "/dashboard/static/dashboard.js", {}),
                ("no key", "/dashboard/events", {}),
                ("wrong key", "/dashboard/events?api_key=nope", {}),
                ("key in a query elsewhere", "/v1/models?api_key=secret", {}),
                ("key", "/dashboard/events?api_key=secret", {}),
                ("header", "/dashboard/events", {"Authorization": "Bearer secret"})]:
            response = await client.get(path, headers=headers)
            statuses[name] = response.status
            if response.status == 401:
                assert (await response.json())["error"]["code"] == "invalid_api_key"
            elif name in ("key", "header"):
                await read_events(response, 1)
            response.close()
        return statuses

    statuses = scripted.serve(test, app_kwargs={"api_key": "secret"})
    assert statuses == {"page": 200, "script": 200, "no key": 401, "wrong key": 401,
                        "key in a query elsewhere": 401, "key": 200, "header": 200}


def test_a_disabled_dashboard_serves_nothing_and_adds_no_observer(scripted):
    async def test(client, engine):
        return [(await client.get(path)).status for path in
                ("/dashboard", "/dashboard/events", "/dashboard/static/dashboard.js")]

    assert scripted.serve(test, app_kwargs={"enable_dashboard": False}) == [404, 404, 404]
    engine = AsyncEngine(scripted.engine())
    try:
        build_app(engine, served_model_names=["m"], enable_dashboard=False)
        assert isinstance(engine.observer, ServerMetrics)
        build_app(engine, served_model_names=["m"])
        assert isinstance(engine.observer, ObserverGroup)
    finally:
        engine.shutdown()


def test_an_open_stream_does_not_hold_up_shutdown(scripted):
    async_engine = AsyncEngine(scripted.engine())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main():
        app = build_app(async_engine, served_model_names=["scripted"])
        stop = asyncio.Event()
        server = asyncio.create_task(serve_http(app, "127.0.0.1", port, shutdown_timeout=30,
                                                stop=stop))
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    response = await session.get(f"http://127.0.0.1:{port}/dashboard/events")
                    break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.02)
            await read_events(response, 1)
            stop.set()
            start = time.monotonic()
            await asyncio.wait_for(server, 10)
            return time.monotonic() - start

    try:
        assert asyncio.run(main()) < 5  # not the 30 s grace period
    finally:
        async_engine.shutdown()


def test_the_real_engine_streams_valid_events(api_server):
    """After a few requests on the real server, its events validate and count them."""
    for i in range(3):
        status, _ = api_server.request(
            "POST", "/v1/completions", {"model": "tiny-qwen2", "prompt": f"Hello {i}",
                                        "max_tokens": 3},
            headers={"Authorization": "Bearer test-key"})
        assert status == 200
    events = []
    url = api_server.url + "/dashboard/events?api_key=test-key"
    with urllib.request.urlopen(url, timeout=30) as response:
        for line in response:
            if line.startswith(b"data: "):
                events.append(json.loads(line[len(b"data: "):]))
                VALIDATOR.validate(events[-1])
                if len(events) == 2:
                    break
    history, summary = events
    assert history["type"] == "history" and summary["type"] == "summary"
    # the seconds tile time: the history and the summary after it count every step once
    generated = sum(s["tokens"]["decode"] for s in history["summaries"] + [summary])
    assert generated >= 3 * 2  # each request fed back at least its first 2 tokens
    assert summary["prefix_cache"]["total_queries"] > 0
    cells, per_cell = summary["block_map"]["cells"], summary["block_map"]["blocks_per_cell"]
    assert len(cells) == -(-summary["kv"]["num_blocks"] // per_cell)
    assert summary["compilations"] > 0  # warm-up's


@pytest.mark.slow
def test_a_server_started_with_disable_dashboard_serves_none(start_server):
    server = start_server("--disable-dashboard")
    try:
        assert server.request("GET", "/dashboard")[0] == 404
        assert server.request("GET", "/dashboard/events")[0] == 404
        assert server.request("GET", "/dashboard/static/dashboard.js")[0] == 404
        assert server.request("GET", "/v1/models")[0] == 200
    finally:
        assert server.stop() == 0, server.log()
