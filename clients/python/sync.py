"""The blocking client: plain sockets, one request at a time, for scripts and the CLI.

    with Client() as client:
        for chunk in client.stream("def fib(n):", max_tokens=64):
            print(chunk.text, end="")

Leaving a ``stream`` early (``break`` or an exception) cancels the request on the daemon.
Every failure is an ``MlxdError``: a connection the daemon closed or that broke is a
``ConnectionClosedError`` (or the error the daemon said it closed it for), never an OSError.
Threading: not shared between threads; use one client per thread.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

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
    ToolCall,
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
from .exceptions import (
    ConnectionClosedError,
    DaemonUnavailableError,
    MlxdError,
    RequestTimeoutError,
    error_from,
)


class Client:
    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        timeout: float | None = None,
        name: str = "mlxd.client",
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self._ids = itertools.count(1)
        self._encoder = Encoder()
        check_socket_owner(self.socket_path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.socket_path))
        except OSError as exc:
            self._sock.close()
            raise DaemonUnavailableError(
                "daemon_unavailable", f"no mlxd at {self.socket_path}: {exc.strerror or exc}"
            ) from exc
        try:
            self._send(Hello(protocol=PROTOCOL_VERSION, client=name))
            reply = self._read()
        except MlxdError:
            self.close()
            raise
        if isinstance(reply, Error):
            self.close()
            raise error_from(reply)
        if not isinstance(reply, Welcome):
            self.close()
            raise ConnectionClosedError("connection_closed", f"not a welcome: {reply!r}")
        self.welcome: Welcome = reply

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        tokens: list[int] | None = None,
        on_progress: OnProgress | None = None,
        **options: Any,
    ) -> Iterator[Chunk | Done]:
        """Yields each ``Chunk``, then the final ``Done``; raises ``MlxdError`` on an error.
        ``on_progress`` is called with each ``Progress`` while the model loads first."""
        request = generate_request(
            next(self._ids), prompt, messages=messages, tokens=tokens, **options
        )
        self._send(request)
        finished = False
        try:
            while True:
                message = self._read_for(request.id)
                if isinstance(message, Queued):
                    continue
                if isinstance(message, Progress):
                    if on_progress is not None:
                        on_progress(message)
                    continue
                if isinstance(message, Chunk):
                    yield message
                    continue
                finished = True
                if isinstance(message, Error):
                    raise error_from(message)
                yield message
                return
        finally:
            if not finished:
                self._cancel_and_drain(request.id)

    def generate(self, prompt: str | None = None, **options: Any) -> Completion:
        parts: list[str] = []
        thoughts: list[str] = []
        ids: list[int] = []
        calls: list[ToolCall] = []
        for message in self.stream(prompt, **options):
            if isinstance(message, Chunk):
                parts.append(message.text)
                thoughts.append(message.reasoning)
                ids.extend(message.tokens)
                calls.extend(message.tool_calls or ())
            else:
                return Completion("".join(parts), ids, message, "".join(thoughts), calls)
        raise ConnectionClosedError("connection_closed", "the stream ended without done")

    def chat(self, messages: Messages, **options: Any) -> Completion:
        return self.generate(messages=messages, **options)

    def warm(
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
        return self._call(request, on_progress)

    def load(
        self, model: str, keep_alive: float | None = None, on_progress: OnProgress | None = None
    ) -> ModelInfo:
        """Load ``model`` (if it is not resident); ``on_progress`` hears how the load goes."""
        request = Load(id=next(self._ids), model=model, keep_alive=keep_alive)
        done = self._call(request, on_progress)
        assert done.model is not None
        return done.model

    def unload(self, model: str) -> None:
        self._call(Unload(id=next(self._ids), model=model))

    def clear_cache(self, model: str | None = None) -> None:
        """Drop the prompt cache of ``model``, or of every model."""
        self._call(ClearCache(id=next(self._ids), model=model))

    def models(self) -> list[ModelInfo]:
        return self._call(ListModels(id=next(self._ids))).models or []

    def health(self) -> Health:
        """Answered by the daemon's event loop, even while its worker is busy."""
        done = self._call(GetHealth(id=next(self._ids)))
        assert done.health is not None
        return done.health

    def stats(self, reset_peak: bool = False) -> ServerStats:
        """``reset_peak`` starts the peak-memory figures over after this reading."""
        done = self._call(GetStats(id=next(self._ids), reset_peak=reset_peak))
        assert done.stats is not None
        return done.stats

    def ping(self) -> float:
        start = time.perf_counter()
        self._call(Ping(id=next(self._ids)))
        return time.perf_counter() - start

    # ------------------------------------------------------------------ plumbing

    def _call(self, request: Any, on_progress: OnProgress | None = None) -> Done:
        self._send(request)
        message = self._read_for(request.id)
        # A warm waiting for a place in the batch; a load, or a warm, loading its model.
        while isinstance(message, Queued | Progress):
            if on_progress is not None and isinstance(message, Progress):
                on_progress(message)
            message = self._read_for(request.id)
        if isinstance(message, Error):
            raise error_from(message)
        return message

    def _cancel_and_drain(self, target: int) -> None:
        try:
            self._send(Cancel(id=next(self._ids), target=target))
            while isinstance(self._read_for(target), Chunk | Queued | Progress):
                pass
        except (OSError, ConnectionClosedError):
            pass  # the connection is gone: the daemon cancels on disconnect

    def _send(self, message: Any) -> None:
        try:
            self._sock.sendall(self._encoder.frame(message))
        except TimeoutError:
            self._timed_out()
        except OSError as exc:
            # The daemon closed first (a refused connect: the error is sent, then the
            # close, and our hello can meet the close): say what it said, if it said it.
            raise self._why_closed(exc) from None

    def _why_closed(self, exc: OSError) -> MlxdError:
        """The connection-level error the daemon sent before closing, if one is still
        waiting to be read, else a ``ConnectionClosedError``."""
        closed = ConnectionClosedError(
            "connection_closed", f"the daemon closed the connection ({exc.strerror or exc})"
        )
        try:
            self._sock.settimeout(1.0)  # the peer is gone: reads get what is queued, then EOF
            while True:
                message = self._read()
                if isinstance(message, Error) and message.id is None:
                    return error_from(message)
        except (MlxdError, OSError):
            return closed

    def _read_for(self, request_id: int) -> Any:
        """The next message for ``request_id``; others (a cancel's reply, say, or a type
        this client does not know) are skipped."""
        while True:
            message = self._read()
            if getattr(message, "id", None) == request_id:
                return message
            if isinstance(message, Error) and message.id is None:
                raise error_from(message)

    def _read(self) -> Any:
        header = self._receive_exactly(HEADER_SIZE)
        return decode_server_message(self._receive_exactly(frame_length(header)))

    def _receive_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                part = self._sock.recv(n - len(buf))
            except TimeoutError:
                self._timed_out()
            except OSError as exc:  # e.g. ECONNRESET: closed with our data unread
                raise ConnectionClosedError(
                    "connection_closed", f"the connection broke: {exc.strerror or exc}"
                ) from None
            if not part:
                raise ConnectionClosedError("connection_closed", "the daemon closed the connection")
            buf += part
        return bytes(buf)

    def _timed_out(self) -> NoReturn:
        # A frame may be half read or half written: the connection cannot go on.
        timeout = self._sock.gettimeout()
        self.close()
        raise RequestTimeoutError("timeout", f"no reply within {timeout} s")
