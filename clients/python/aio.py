"""The async client (anyio): one connection, many requests in flight, streamed by id.

    async with AsyncClient() as client:
        async for chunk in client.stream("def fib(n):", max_tokens=64):
            print(chunk.text, end="")

Leaving a ``stream`` early (``break``, an exception, or dropping it) cancels the request
on the daemon. Every failure is an ``MlxdError`` (never an anyio error, an OSError or an
exception group): a connection the daemon closed, or that broke, is a
``ConnectionClosedError``, or the error the daemon said it closed it for. What leaves an
``async with AsyncClient()`` block (an ``MlxdError``, the caller's own exception, a
cancellation) leaves it as it is, not wrapped in the reader's task group's group.
Threading: one event loop; the client is not shared between threads.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mlxd.protocol import (
    HEADER_SIZE,
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    ClearCache,
    Done,
    Encoder,
    Error,
    GetHealth,
    GetStats,
    Health,
    Hello,
    ListModels,
    Load,
    ModelInfo,
    Ping,
    Progress,
    Queued,
    ServerStats,
    Unload,
    Welcome,
    frame_length,
)
from mlxd.protocol.paths import default_socket_path

from ._common import (
    Completion,
    Messages,
    OnProgress,
    check_socket_owner,
    decode_server_message,
    generate_request,
    warm_request,
)
from ._sockets import AnyioConnection, AsyncioConnection, connect, settled
from .exceptions import ConnectionClosedError, DaemonUnavailableError, MlxdError, error_from

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # anyio's dependency there


class AsyncClient:
    def __init__(self, socket_path: str | Path | None = None, *, name: str = "mlxd.client") -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.welcome: Welcome | None = None
        self._name = name
        self._ids = itertools.count(1)
        self._routes: dict[int, MemoryObjectSendStream[Any]] = {}
        self._encoder = Encoder()
        self._send_lock = anyio.Lock()
        self._stream: AsyncioConnection | AnyioConnection | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed: MlxdError | None = None

    async def __aenter__(self) -> AsyncClient:
        check_socket_owner(self.socket_path)
        try:
            self._stream = await connect(self.socket_path)
        except OSError as exc:
            raise DaemonUnavailableError(
                "daemon_unavailable", f"no mlxd at {self.socket_path}: {exc.strerror or exc}"
            ) from exc
        try:
            self.welcome = await self._handshake()
            self._stream = await settled(self._stream)
        except BaseException:
            await self._stream.aclose()
            raise
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reader)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._tg is not None and self._stream is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(et, e, tb)
        except BaseExceptionGroup as group:
            # The task group wraps the exception leaving the block (an MlxdError, the
            # caller's own). The reader never raises (it keeps its failure for the requests),
            # so that exception is all the group holds: returning lets it go on unwrapped,
            # with its own traceback, and ``except UnknownModelError`` catches it.
            if e is None or any(inner is not e for inner in group.exceptions):
                raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()
        return False

    # ------------------------------------------------------------------ requests

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        tokens: list[int] | None = None,
        on_progress: OnProgress | None = None,
        **options: Any,
    ) -> GenerationStream:
        """Chunks of a completion as an async iterator; ``.done`` holds the end once reached.
        ``on_progress`` is called with each ``Progress`` while the model loads first."""
        request = generate_request(
            next(self._ids), prompt, messages=messages, tokens=tokens, **options
        )
        return GenerationStream(self, request, on_progress)

    async def generate(self, prompt: str | None = None, **options: Any) -> Completion:
        stream = self.stream(prompt, **options)
        parts, thoughts, ids, calls = [], [], [], []
        async with stream:
            async for chunk in stream:
                parts.append(chunk.text)
                thoughts.append(chunk.reasoning)
                ids.extend(chunk.tokens)
                calls.extend(chunk.tool_calls or ())
        assert stream.done is not None
        return Completion("".join(parts), ids, stream.done, "".join(thoughts), calls)

    async def chat(self, messages: Messages, **options: Any) -> Completion:
        return await self.generate(messages=messages, **options)

    async def warm(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        tokens: Sequence[int] | None = None,
        on_progress: OnProgress | None = None,
        **options: Any,
    ) -> Done:
        """Prefill into the prompt cache without generating; ``pin=True`` (with ``ttl_s``)
        keeps it through eviction. The ``done`` has the prompt's usage and cache use."""
        request = warm_request(next(self._ids), prompt, messages=messages, tokens=tokens, **options)
        return await self._call(request, on_progress)

    async def load(
        self, model: str, keep_alive: float | None = None, on_progress: OnProgress | None = None
    ) -> ModelInfo:
        """Load ``model`` (if it is not resident); ``on_progress`` hears how the load goes."""
        request = Load(id=next(self._ids), model=model, keep_alive=keep_alive)
        done = await self._call(request, on_progress)
        assert done.model is not None
        return done.model

    async def unload(self, model: str) -> None:
        await self._call(Unload(id=next(self._ids), model=model))

    async def clear_cache(self, model: str | None = None) -> None:
        """Drop the prompt cache of ``model``, or of every model."""
        await self._call(ClearCache(id=next(self._ids), model=model))

    async def models(self) -> list[ModelInfo]:
        return (await self._call(ListModels(id=next(self._ids)))).models or []

    async def health(self) -> Health:
        """Answered by the daemon's event loop, even while its worker is busy."""
        done = await self._call(GetHealth(id=next(self._ids)))
        assert done.health is not None
        return done.health

    async def stats(self, reset_peak: bool = False) -> ServerStats:
        """``reset_peak`` starts the peak-memory figures over after this reading."""
        done = await self._call(GetStats(id=next(self._ids), reset_peak=reset_peak))
        assert done.stats is not None
        return done.stats

    async def ping(self) -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        await self._call(Ping(id=next(self._ids)))
        return time.perf_counter() - start

    async def cancel(self, request_id: int) -> None:
        await self._call(Cancel(id=next(self._ids), target=request_id))

    # ------------------------------------------------------------------ plumbing

    async def _handshake(self) -> Welcome:
        closed = ConnectionClosedError("connection_closed", "closed during the handshake")
        try:
            await self._write(Hello(protocol=PROTOCOL_VERSION, client=self._name))
        except ConnectionClosedError as exc:
            # A refused connect: the daemon sends its error and closes, and our hello can
            # meet the close. The error is still there to read.
            closed = exc
        try:
            reply = await self._read()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            raise closed from None
        if isinstance(reply, Error):
            raise error_from(reply)
        if not isinstance(reply, Welcome):
            raise ConnectionClosedError("connection_closed", f"not a welcome: {reply!r}")
        return reply

    def _route(self, request_id: int) -> MemoryObjectReceiveStream[Any]:
        if self._closed is not None:
            raise self._closed
        send, receive = anyio.create_memory_object_stream[Any](max_buffer_size=1 << 16)
        self._routes[request_id] = send
        return receive

    def _unroute(self, request_id: int) -> None:
        route = self._routes.pop(request_id, None)
        if route is not None:
            route.close()

    async def _call(self, request: Any, on_progress: OnProgress | None = None) -> Done:
        receive = self._route(request.id)
        try:
            await self._write(request)
            message = await _next(receive)
            # A warm waiting for a place in the batch; a load, or a warm, loading its model.
            while isinstance(message, Queued | Progress):
                if on_progress is not None and isinstance(message, Progress):
                    on_progress(message)
                message = await _next(receive)
        except anyio.EndOfStream:
            raise self._closed or ConnectionClosedError("connection_closed", "closed") from None
        finally:
            self._unroute(request.id)
        if isinstance(message, Error):
            raise error_from(message)
        return message

    async def _write(self, message: Any) -> None:
        assert self._stream is not None
        frame = self._encoder.frame(message)
        try:
            async with self._send_lock:
                await self._stream.send(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            # The daemon closed before the reader noticed: the reader's reason if it has one.
            raise self._closed or ConnectionClosedError(
                "connection_closed", f"the daemon closed the connection ({exc!r})"
            ) from None

    async def _write_quietly(self, message: Any) -> None:
        """For a cancel: if the connection is gone, the daemon has cancelled on its own."""
        with contextlib.suppress(MlxdError):
            await self._write(message)

    async def _read(self) -> Any:
        assert self._stream is not None
        header = await self._stream.receive_exactly(HEADER_SIZE)
        return decode_server_message(await self._stream.receive_exactly(frame_length(header)))

    async def _reader(self) -> None:
        try:
            while True:
                message = await self._read()
                if message is None:
                    continue  # a message type newer than this client
                request_id = getattr(message, "id", None)
                route = self._routes.get(request_id) if request_id is not None else None
                if route is not None:
                    route.send_nowait(message)
                elif isinstance(message, Error) and request_id is None:
                    self._closed = error_from(message)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        except Exception as exc:  # a bad frame, say: never out of the task group
            self._closed = ConnectionClosedError(
                "connection_closed", f"the connection failed: {exc!r}"
            )
        finally:
            if self._closed is None:
                self._closed = ConnectionClosedError(
                    "connection_closed", "the daemon closed the connection"
                )
            for route in self._routes.values():
                route.close()


async def _next(receive: MemoryObjectReceiveStream[Any]) -> Any:
    """The next message of a request: at once if the reader has already routed it (anyio's
    ``receive`` first yields to the loop, an iteration per token), else when it comes."""
    try:
        return receive.receive_nowait()
    except anyio.WouldBlock:
        return await receive.receive()


class GenerationStream:
    """One generate request: iterate for ``Chunk``\\s; ``done`` is set when it ends.

    Leaving early cancels the request on the daemon: ``aclose()`` (or ``async with``)
    does it at once; a stream dropped mid-way sends the cancel from ``__del__``.
    """

    def __init__(
        self, client: AsyncClient, request: Any, on_progress: OnProgress | None = None
    ) -> None:
        self.client = client
        self.request = request
        self.id: int = request.id
        self.done: Done | None = None
        self.position: int | None = None
        """The request's place in the daemon's queue while it waits (0 is next)."""
        self.progress: Progress | None = None
        """The latest news of its model's load, if it had to wait for one."""
        self._on_progress = on_progress
        self._receive: MemoryObjectReceiveStream[Any] | None = None
        self._ended = False

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if self._ended:
            raise StopAsyncIteration
        if self._receive is None:
            self._receive = self.client._route(self.id)
            try:
                await self.client._write(self.request)
            except MlxdError:
                self._end()
                raise
        try:
            message = await _next(self._receive)
        except anyio.EndOfStream:
            self._end()
            raise self.client._closed or ConnectionClosedError(
                "connection_closed", "closed"
            ) from None
        while isinstance(message, Queued | Progress):
            if isinstance(message, Queued):
                self.position = message.position
            else:
                self.progress = message
                if self._on_progress is not None:
                    self._on_progress(message)
            message = await _next(self._receive)
        if isinstance(message, Chunk):
            self.position = None
            return message
        self._end()
        if isinstance(message, Error):
            raise error_from(message)
        self.done = message
        raise StopAsyncIteration

    def _end(self) -> None:
        self._ended = True
        self.client._unroute(self.id)

    async def aclose(self) -> None:
        """Cancel the request if it is still running, and wait for it to end."""
        if self._ended or self._receive is None:
            self._ended = True
            return
        await self.client._write_quietly(Cancel(id=next(self.client._ids), target=self.id))
        # The request is over either way: a connection lost meanwhile is no error of this.
        with anyio.move_on_after(10), contextlib.suppress(MlxdError):
            async for _ in self:
                pass
        self._end()

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if self._ended or self._receive is None or self.client._tg is None:
            return
        client, target = self.client, self.id
        client._unroute(target)
        # If the client is closing, start_soon fails: the daemon cancels on disconnect anyway.
        with contextlib.suppress(RuntimeError):
            client._tg.start_soon(
                client._write_quietly, Cancel(id=next(client._ids), target=target)
            )


__all__ = ["AsyncClient", "GenerationStream", "MlxdError"]
