"""The OpenAI-compatible HTTP server: schemas, routes, streaming, errors and metrics.

`api_server.build_app(async_engine, ...)` is the aiohttp app; `jaxserve serve` runs it.
"""
