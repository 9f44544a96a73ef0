"""The HTTP front end: OpenAI- and Ollama-compatible APIs, on the daemon's own event loop.

aiohttp serves HTTP/1.1 on the loop that serves the native socket (no second loop, no
thread). Each API module (``openai_api``, ``ollama_api``) is an adapter: it decodes a body
into a msgspec ``Struct`` once, builds the native request (``Generate``, ``ListModels``,
...) and turns the worker's events (``Chunk``, ``Done``, ``Error``) into its API's
responses. The worker cannot tell an HTTP request from a native one: the same queue, the
same batches, the same prompt cache.

``HttpCall`` stands in for a native ``Connection`` for one HTTP request: it is the sink's
``conn``, so ``Server._deliver`` routes, counts and logs its events like any other; it is
in ``Server.connections`` while it runs, so a dying worker fails it and shutdown drains it.

Threading: event loop only; never calls MLX.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mlxd.protocol import Done, Error, errors

if TYPE_CHECKING:
    from .server import Server

SERVER_KEY = web.AppKey("mlxd_server", object)

STATUS = {
    errors.INVALID_REQUEST: 400,
    errors.INVALID_MESSAGE: 400,
    errors.PROMPT_TOO_LONG: 400,
    errors.PERMISSION_DENIED: 403,
    errors.UNKNOWN_MODEL: 404,
    errors.TOO_MANY_REQUESTS: 429,
    errors.MODEL_LOAD_FAILED: 500,
    errors.INTERNAL_ERROR: 500,
    errors.OVERLOADED: 503,
    errors.INSUFFICIENT_MEMORY: 503,
    errors.SHUTTING_DOWN: 503,
    errors.WORKER_UNAVAILABLE: 503,
}
"""The HTTP status for each native error code (each API words its own error body)."""


def status_for(code: str) -> int:
    return STATUS.get(code, 500)


class HttpCall:
    """One HTTP request's stand-in for a native connection: what the worker's events for
    it are delivered to (``send``), and the requests it has in flight (``pending``)."""

    def __init__(self, server: Server, api: str) -> None:
        self.server = server
        self.api = api
        self.pending: dict[int, Any] = {}
        self.closed = False
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._ids = 0

    def send(self, message: Any) -> None:
        if not self.closed:
            self._events.put_nowait(message)

    async def close(self) -> None:
        self.closed = True
        for pending in self.pending.values():
            self.server.worker.cancel(pending)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def events(self, request: Any) -> AsyncIterator[Any]:
        """Submit ``request`` (a native request, its ``id`` from ``next_id``) and yield its
        events through its ``done`` or ``error``. Leaving early (the HTTP client went away,
        the handler was cancelled) cancels it before its next decode step."""
        from .server import _Pending

        server = self.server
        if not server.accepting:
            yield Error(
                id=request.id, code=errors.SHUTTING_DOWN, message="the daemon is shutting down"
            )
            return
        pending = _Pending(self, request, time.perf_counter())
        self.pending[request.id] = pending
        server.connections.add(self)  # type: ignore[arg-type]
        server.requests_total += 1
        server.worker.submit(request, pending, pending.received_at)
        try:
            while True:
                message = await self._events.get()
                yield message
                if isinstance(message, Done | Error):
                    return
        finally:
            if request.id in self.pending:
                server.worker.cancel(pending)
            if not self.pending:
                server.connections.discard(self)  # type: ignore[arg-type]

    async def call(self, request: Any) -> Done | Error:
        """Submit ``request`` and return its final message (a non-streamed reply)."""
        last: Any = None
        async for message in self.events(request):
            last = message
        return last


def parse_listen(spec: str) -> tuple[str, int] | Path:
    """``HOST:PORT`` (an IPv6 host in brackets) or ``unix:PATH``."""
    if spec.startswith("unix:"):
        return Path(spec[5:]).expanduser()
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--http {spec!r}: expected HOST:PORT or unix:PATH")
    return host.strip("[]"), int(port)


async def start_http(server: Server, spec: str) -> web.AppRunner:
    """Listen for HTTP at ``spec`` on the running loop; returns the runner to clean up."""
    from . import ollama_api, openai_api
    from .anthropic_api import add_routes as add_anthropic_routes
    from .responses_api import add_routes as add_responses_routes

    app = web.Application(client_max_size=server.config.max_frame_bytes)
    app[SERVER_KEY] = server
    openai_api.add_routes(app)
    ollama_api.add_routes(app)
    add_responses_routes(app)
    add_anthropic_routes(app)
    # handler_cancellation: a client that disconnects cancels its handler, whose
    # ``events`` then cancels the request in the worker.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    where = parse_listen(spec)
    if isinstance(where, Path):
        site: web.BaseSite = web.UnixSite(runner, str(where))
    else:
        site = web.TCPSite(runner, where[0], where[1])
    await site.start()
    return runner


def server_of(request: web.Request) -> Server:
    return request.app[SERVER_KEY]  # type: ignore[return-value]
