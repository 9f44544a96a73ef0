"""The HTTP front end: OpenAI- and Ollama-compatible APIs, on the daemon's own event loop.

aiohttp serves HTTP/1.1 on the loop that serves the native socket (no second loop, no
thread). Each API module (``openai_api``, ``ollama_api``) is an adapter: it decodes a body
into a msgspec ``Struct`` once, builds the native request (``Generate``, ``ListModels``,
...) and turns the worker's events (``Chunk``, ``Done``, ``Error``) into its API's
responses. The worker cannot tell an HTTP request from a native one: the same queue, the
same batches, the same prompt cache.

``HttpCall`` stands in for a native ``Connection`` for one HTTP request: it is the sink's
``conn``, so ``Server._deliver`` routes, counts and logs its events like any other; it is
in ``Server.connections`` while it runs, so a dying worker fails it and shutdown drains it
(and an HTTP request in flight counts against ``max_connections``, as a native connection).

Who may connect (``_guard``, a middleware in front of every route): a loopback bind or
``unix:PATH`` (a 0600 socket in a private folder) unless an API key is configured
(``check_http``, before anything binds); with a key, every request presents it
(``Authorization: Bearer`` or ``x-api-key``) or gets 401; on Linux, a loopback TCP peer of
another user id (the kernel's socket table, ``/proc/net/tcp{,6}``) gets 403 unless it
presents the key. HTTP-level errors (404, 405, 413) get a JSON body in the path's API shape.

Threading: event loop only; never calls MLX.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mlxd.protocol import Chunk, Done, Error, errors

from .http_auth import check_http, parse_listen, tcp_peer_uid
from .transport import bind_unix_socket, prepare_dir

if TYPE_CHECKING:
    from .server import Server

SERVER_KEY = web.AppKey("mlxd_server", object)
API_KEY = web.AppKey("mlxd_api_key", object)
"""The API key (str) clients must present, or None: none configured."""
PEERS_KEY = web.AppKey("mlxd_peers", object)
"""aiohttp's per-connection ``RequestHandler`` -> the peer's uid (None: unknown)."""
TCP_KEY = web.AppKey("mlxd_tcp", object)
"""Whether the listener is TCP (a peer uid to check on Linux) rather than ``unix:PATH``."""
_CALLS: contextvars.ContextVar[list[HttpCall] | None] = contextvars.ContextVar(
    "mlxd_http_calls", default=None
)
"""The ``HttpCall``s made while handling the current request: ``_guard`` cancels what they
left in flight once the handler returns, raises or is cancelled."""

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


RETRY_AFTER_S = 1
"""What ``Retry-After`` says for a 429 or 503: the queue moves in about that long."""


def retry_after_headers(code: str) -> dict[str, str]:
    """``Retry-After`` for a native error that passes (overloaded, too many requests,
    insufficient memory, a restarting worker or daemon); no headers for the others."""
    if status_for(code) in (429, 503):
        return {"Retry-After": str(RETRY_AFTER_S)}
    return {}


OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error",
}  # fmt: skip
"""OpenAI's error ``type`` by status; any other status is a ``server_error``."""

ANTHROPIC_TYPES = {
    401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error",
}  # fmt: skip
"""Anthropic's error ``type`` by status (529 is its own overloaded, what its SDK retries as
``OverloadedError``); any other status is an ``invalid_request_error`` below 500 and an
``api_error`` from 500, a 503 included (docs/HTTP.md's table)."""


def anthropic_type(status: int) -> str:
    default = "invalid_request_error" if status < 500 else "api_error"
    return ANTHROPIC_TYPES.get(status, default)


def error_response(
    request: web.Request, status: int, code: str, message: str, headers: Any = None
) -> web.Response:
    """An error in the shape of the API ``request`` is for (its path): Ollama's
    ``{"error": "..."}`` under ``/api/``, Anthropic's under ``/v1/messages``, else OpenAI's
    ``{"error": {"message", "type", "param", "code"}}``."""
    path = request.path
    body: dict[str, Any]
    if path.startswith("/api/"):
        body = {"error": message}
    elif path.startswith("/v1/messages"):
        body = {"type": "error", "error": {"type": anthropic_type(status), "message": message}}
    else:
        kind = OPENAI_TYPES.get(status, "server_error")
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


PAUSE_BACKLOG = 64
"""Events queued for an HTTP call, unread because its client does not read (the handler
waits on the transport's drain), past which its sequences give up their batch places
(``Worker.pause``) until the handler has caught up, as a native connection's do."""


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
        self._left: set[int] = set()
        """Requests cancelled by leaving ``events``: their last event still comes."""
        self._paused = False
        calls = _CALLS.get()
        if calls is not None:
            calls.append(self)

    def send(self, message: Any) -> None:
        if isinstance(message, Done | Error) and message.id in self._left:
            self._left.discard(message.id)  # its handler is gone: nobody reads it
            if not (self.pending.keys() - {message.id}):
                self.server.connections.discard(self)  # type: ignore[arg-type]
            return
        if not self.closed:
            self._events.put_nowait(message)
            if not self._paused and self._events.qsize() >= PAUSE_BACKLOG:
                self._paused = True
                self.server.worker.pause(self)

    def _unpause(self) -> None:
        if self._paused:
            self._paused = False
            self.server.worker.resume(self)

    def cancel_all(self) -> None:
        """Cancel what is still in flight (the handler is done with this call)."""
        for rid, pending in list(self.pending.items()):
            if rid not in self._left:
                self._left.add(rid)
                self.server.worker.cancel(pending)
        if not self.pending:
            self.server.connections.discard(self)  # type: ignore[arg-type]

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
        conns = server.connections
        if self not in conns and len(conns) >= server.config.max_connections:
            yield Error(id=request.id, code=errors.OVERLOADED, message="too many connections")
            return
        pending = _Pending(self, request, time.perf_counter())
        self.pending[request.id] = pending
        server.connections.add(self)  # type: ignore[arg-type]
        server.requests_total += 1
        server.worker.submit(request, pending, pending.received_at)
        try:
            carry: Any = None
            while True:
                if carry is None:
                    message = await self._events.get()
                else:
                    message, carry = carry, None
                # Chunks that piled up while the loop was busy go out as one: one event
                # (and one write) for them all, so a loop that falls behind catches up
                # instead of paying per token; the native path merges the same way.
                while isinstance(message, Chunk) and not self._events.empty():
                    following = self._events.get_nowait()
                    if isinstance(following, Chunk) and following.id == message.id:
                        message = Chunk(
                            id=message.id,
                            text=message.text + following.text,
                            tokens=message.tokens + following.tokens,
                            logprobs=_joined(message.logprobs, following.logprobs),
                        )
                    else:
                        carry = following
                        break
                if carry is None and self._events.empty():
                    self._unpause()  # the client reads again: caught up
                yield message
                if isinstance(message, Done | Error):
                    return
        finally:
            if request.id in self.pending and request.id not in self._left:
                self._left.add(request.id)
                server.worker.cancel(pending)
            self._unpause()  # after the cancel: nothing of this call resumes
            if not self.pending:
                server.connections.discard(self)  # type: ignore[arg-type]

    async def call(self, request: Any) -> Done | Error:
        """Submit ``request`` and return its final message (a non-streamed reply)."""
        last: Any = None
        async for message in self.events(request):
            last = message
        return last


def _joined(first: list[Any] | None, then: list[Any] | None) -> list[Any] | None:
    """Two merged chunks' logprobs: one per token of the merged chunk, in order."""
    return None if first is None or then is None else first + then


async def next_reply(events: AsyncIterator[Any]) -> Any:
    """The next of ``HttpCall.events`` that is not a ``Queued`` or ``Progress``: a chunk,
    the done or the error (for handlers that hold their headers until the first token)."""
    async for message in events:
        if isinstance(message, Chunk | Done | Error):
            return message
    return Error(code=errors.INTERNAL_ERROR, message="no reply")


async def _peer_uid(request: web.Request) -> int | None:
    """The peer's uid, looked up once per connection (cached on aiohttp's handler for
    it); None where the kernel does not say (not Linux, not TCP, not found). The lookup
    reads the kernel's whole socket table, which takes milliseconds (about 8 on a small
    VM, more with many sockets): in a thread, so that no other stream waits for it."""
    proto = request.protocol
    peers: dict[Any, int | None] = request.app[PEERS_KEY]  # type: ignore[assignment]
    if proto in peers:
        return peers[proto]
    for gone in [h for h in peers if h.transport is None]:  # closed connections
        del peers[gone]
    transport = request.transport
    uid = None
    if transport is not None:
        peer, ours = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        if isinstance(peer, tuple) and isinstance(ours, tuple):
            loop = asyncio.get_running_loop()
            uid = await loop.run_in_executor(None, tcp_peer_uid, peer, ours)
    peers[proto] = uid
    return uid


def _presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    key: str | None = request.app[API_KEY]  # type: ignore[assignment]
    presented = _presented_key(request)
    authorized = (
        key is not None
        and presented is not None
        and hmac.compare_digest(presented.encode(), key.encode())
    )
    if not authorized:
        if presented is not None and key is not None:
            return error_response(request, 401, "invalid_api_key", "the API key is wrong")
        if request.app[TCP_KEY] and sys.platform.startswith("linux"):
            server = server_of(request)
            uid = await _peer_uid(request)
            if uid != os.getuid() and not (uid == 0 and server.config.allow_root):
                who = "an unknown user" if uid is None else f"uid {uid}"
                return error_response(
                    request, 403, "permission_denied",
                    f"this daemon serves its own user, not {who}; present the API key",
                )  # fmt: skip
        if key is not None:
            return error_response(
                request, 401, "invalid_api_key",
                "an API key is required: Authorization: Bearer <key> (or x-api-key)",
            )  # fmt: skip
    if (request.content_length or 0) > request.client_max_size:  # before reading it
        return _http_error(request, web.HTTPRequestEntityTooLarge(
            max_size=request.client_max_size, actual_size=request.content_length or 0
        ))  # fmt: skip
    calls: list[HttpCall] = []
    token = _CALLS.set(calls)
    try:
        response = await handler(request)
        if response.status in (429, 503) and not response.prepared:
            for name, value in retry_after_headers(errors.OVERLOADED).items():
                response.headers.setdefault(name, value)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(request, exc)
    finally:
        _CALLS.reset(token)
        for call in calls:  # a handler that returned, raised or was cancelled mid-stream
            call.cancel_all()


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own error (no route, wrong method, a body over the limit) as JSON."""
    messages = {
        404: f"no such endpoint: {request.path}",
        405: f"{request.method} is not allowed on {request.path}",
        413: f"the request body is over the limit of {request.client_max_size} bytes",
    }
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    message = messages.get(exc.status, exc.reason)
    code = codes.get(exc.status, "invalid_request")
    return error_response(request, exc.status, code, message, headers)


async def start_http(server: Server, spec: str) -> web.AppRunner:
    """Listen for HTTP at ``spec`` on the running loop; returns the runner to clean up."""
    from . import ollama_api, openai_api
    from .anthropic_api import add_routes as add_anthropic_routes
    from .responses_api import add_routes as add_responses_routes

    key = check_http(server.config)
    app = web.Application(client_max_size=server.config.max_frame_bytes, middlewares=[_guard])
    app[SERVER_KEY] = server
    app[API_KEY] = key
    app[PEERS_KEY] = {}
    where = parse_listen(spec)
    app[TCP_KEY] = not isinstance(where, Path)
    openai_api.add_routes(app)
    ollama_api.add_routes(app)
    add_responses_routes(app)
    add_anthropic_routes(app)
    sock = None
    if isinstance(where, Path):
        # As the native socket: 0600, in a folder of ours closed to others.
        prepare_dir(where.parent)
        sock = bind_unix_socket(where)

        async def unlink(_: web.Application) -> None:
            with contextlib.suppress(FileNotFoundError):
                where.unlink()

        app.on_cleanup.append(unlink)
    # handler_cancellation: a client that disconnects cancels its handler, whose
    # ``events`` (and ``_guard``) then cancel the request in the worker.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    if sock is not None:
        site: web.BaseSite = web.SockSite(runner, sock)
    else:
        assert isinstance(where, tuple)
        site = web.TCPSite(runner, where[0], where[1])
    await site.start()
    return runner


def server_of(request: web.Request) -> Server:
    return request.app[SERVER_KEY]  # type: ignore[return-value]
