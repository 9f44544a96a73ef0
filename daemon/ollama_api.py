"""The Ollama-compatible HTTP API: an adapter from Ollama's request and response shapes
onto the native requests and events (see daemon/http_server.py).

Threading: event loop only; never calls MLX.
"""

from __future__ import annotations

from aiohttp import web

OLLAMA_VERSION = "0.6.0"
"""The Ollama API version reported to clients (they check it for features)."""


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/version", version)
