"""The front end: an asyncio server on a Unix socket that frames, decodes and routes.

Each connection reads length-prefixed MessagePack frames, decodes each once into the
protocol's request union, answers ``hello`` and ``ping`` itself and hands everything else
to the worker. Replies come back from the worker through ``LoopOutbox`` and are written
with backpressure: a slow reader gets its pending chunks merged, never the worker or
another client stalled.

Threading: everything here runs on the event loop thread; it never calls MLX. The only
ways into the worker are ``Worker.submit``/``cancel``/``pause``/``resume``/``preload``/
``reconfigure``/``stop``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog

from mlxd.protocol import (
    HEADER_SIZE,
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Done,
    Error,
    Generate,
    GetHealth,
    Health,
    Hello,
    Ping,
    Progress,
    ServerStats,
    Welcome,
    decode_request,
    errors,
    frame_length,
)
from mlxd.protocol import Encoder as FrameEncoder

from . import __version__, logs, settings
from .config import Config
from .refusals import diagnose, first_frame
from .transport import (
    InheritedSocket,
    SocketLock,
    bind_unix_socket,
    inherited_socket,
    peer_uid,
    prepare_dir,
)
from .worker import LoopOutbox, Worker, WorkerStats

log = structlog.get_logger("mlxd.server")

WRITE_HIGH_WATER = 256 * 1024
READ_PAUSE_BACKLOG = 1024
"""Replies queued for a client past which its connection stops reading until they are
written: a client that sends and never reads cannot make the daemon queue without end."""


class _CloseConnection(Exception):
    pass


class _Pending:
    """The loop's handle for one request in flight: the worker's opaque ``sink``."""

    __slots__ = ("cancelled", "conn", "cut", "received_at", "request", "withheld")

    def __init__(self, conn: Connection, request: Any, received_at: float) -> None:
        self.conn = conn
        self.request = request
        self.received_at = received_at
        self.cancelled = False
        """Its cancel was answered (or a generate superseding it read): only its end is sent."""
        self.cut = False
        self.withheld = 0
        """Tokens of the chunks not sent since: the worker's step in progress, say."""

    def after_cancel(self, message: Any) -> Any | None:
        """What of ``message`` goes out once the request is cancelled: its end alone, a
        ``done`` that says ``cancelled`` and counts only what was sent if output was held
        back (the worker learns of a cancel between steps, the client at once)."""
        if isinstance(message, Chunk):
            self.cut = True
            self.withheld += len(message.tokens)
        if not isinstance(message, Done | Error):
            return None
        if self.cut and isinstance(message, Done):
            message.finish_reason, message.stop_sequence = "cancelled", None
            if message.usage is not None:
                message.usage.completion_tokens -= self.withheld
        return message

    @property
    def owner(self) -> Connection:
        """What ``Worker.pause``/``resume`` name: the connection the replies go to."""
        return self.conn


class Connection:
    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, _Pending] = {}
        self.closed = False
        self._encoder = FrameEncoder()
        self._queue: collections.deque[Any] = collections.deque()
        self._flusher: asyncio.Task[None] | None = None
        self._paused = False
        """The worker was told this connection's replies pile up unread (``Worker.pause``)."""
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    # ------------------------------------------------------------------ reading

    async def run(self) -> None:
        try:
            timeout = self.server.config.handshake_timeout_s
            try:
                await asyncio.wait_for(self._handshake(), timeout)
            except asyncio.TimeoutError:
                # A silent connection holds a place others need (max_connections).
                log.info("handshake_timeout", timeout_s=timeout)
                self.send(
                    Error(
                        code=errors.HANDSHAKE_REQUIRED,
                        message=f"no hello within {timeout:g} s",
                    )
                )
                raise _CloseConnection from None
            self.server.greeted(self)
            while True:
                payload = await self._read_frame()
                received_at = time.perf_counter()
                try:
                    request = decode_request(payload)
                except Exception as exc:  # any decoding failure is the frame's fault
                    self.send(diagnose(payload, exc))
                    continue
                self._dispatch(request, received_at)
        except (asyncio.IncompleteReadError, ConnectionError, _CloseConnection):
            pass
        finally:
            await self.close()

    async def _read_frame(self) -> bytes:
        if len(self._queue) >= READ_PAUSE_BACKLOG and self._flusher is not None:
            await asyncio.shield(self._flusher)  # until the backlog is written, or the peer gone
        header = await self.reader.readexactly(HEADER_SIZE)
        length = frame_length(header)
        limit = self.server.config.max_frame_bytes
        if length == 0:
            self.send(Error(code=errors.INVALID_FRAME, message="a frame of length 0"))
            raise _CloseConnection
        if length > limit:
            self.send(
                Error(
                    code=errors.FRAME_TOO_LARGE,
                    message=f"a frame of {length} bytes is over the limit of {limit}",
                )
            )
            raise _CloseConnection
        return await self.reader.readexactly(length)

    async def _handshake(self) -> None:
        hello = first_frame(await self._read_frame())
        if isinstance(hello, Error):
            self.send(hello)
            raise _CloseConnection
        config = self.server.config
        self.send(
            Welcome(
                protocol=PROTOCOL_VERSION,
                server=f"mlxd {__version__}",
                max_frame_bytes=config.max_frame_bytes,
                default_model=config.default_model_name(),
            )
        )

    def _dispatch(self, request: Any, received_at: float) -> None:
        if isinstance(request, Ping):
            self.send(Done(id=request.id))
        elif isinstance(request, GetHealth):
            self.send(Done(id=request.id, health=self.server.health()))
        elif isinstance(request, Hello):
            self.send(Error(code=errors.INVALID_MESSAGE, message="hello was already received"))
        elif isinstance(request, Cancel):
            target = self.pending.get(request.target)
            if target is not None:
                self._cancel(target)
            self.send(Done(id=request.id))
        elif request.id in self.pending:
            self.send(
                Error(
                    id=request.id,
                    code=errors.DUPLICATE_ID,
                    message=f"request id {request.id} is already in flight on this connection",
                )
            )
        elif len(self.pending) >= self.server.config.max_requests_per_connection:
            self.send(
                Error(
                    id=request.id,
                    code=errors.TOO_MANY_REQUESTS,
                    message="too many requests in flight on this connection",
                )
            )
        elif not self.server.accepting:
            self.send(
                Error(
                    id=request.id, code=errors.SHUTTING_DOWN, message="the daemon is shutting down"
                )
            )
        else:
            superseded = getattr(request, "supersedes", None)
            if superseded is not None and superseded in self.pending:
                # Queued before the new request, so its place is free when that one comes.
                self._cancel(self.pending[superseded])
            pending = _Pending(self, request, received_at)
            self.pending[request.id] = pending
            self.server.requests_total += 1
            self.server.worker.submit(request, pending, received_at)

    def _cancel(self, pending: _Pending) -> None:
        pending.cancelled = True  # nothing of it but its end follows (Server._deliver)
        self.server.worker.cancel(pending)

    # ------------------------------------------------------------------ writing

    def send(self, message: Any) -> None:
        """Queue or write one message; never blocks, never drops a terminal message."""
        if self.closed:
            return
        if not self._queue and self.writer.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
            self.writer.write(self._encoder.frame(message))
            return
        last = self._queue[-1] if self._queue else None
        if isinstance(message, Chunk) and isinstance(last, Chunk) and last.id == message.id:
            # The reader is slow: merge rather than grow one frame per token.
            last.absorb(message)
        elif isinstance(message, Progress) and isinstance(last, Progress) and last.id == message.id:
            self._queue[-1] = message  # only the latest figure is worth writing
        else:
            self._queue.append(message)
        if not self._paused:
            # The client reads slower than it is written to: its sequences stop taking
            # batch places from others until what is queued here is written.
            self._paused = True
            log.info(
                "connection_paused", unread_bytes=self.writer.transport.get_write_buffer_size()
            )
            self.server.worker.pause(self)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._queue and not self.closed:
                await self.writer.drain()
                if self._queue:
                    self.writer.write(self._encoder.frame(self._queue.popleft()))
            self._unpause()
        except ConnectionError:
            self.writer.transport.abort()
        finally:
            self._flusher = None

    def _unpause(self) -> None:
        if self._paused:
            self._paused = False
            self.server.worker.resume(self)

    async def close(self) -> None:
        # Flush what is queued (an error before closing, say), briefly, then let go.
        if self._flusher is not None and not self.writer.transport.is_closing():
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                await asyncio.wait_for(asyncio.shield(self._flusher), 1.0)
        self.closed = True
        for pending in self.pending.values():
            self.server.worker.cancel(pending)
        self._unpause()  # after the cancels: nothing of this connection resumes
        self.writer.close()
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


class Server:
    def __init__(
        self,
        config: Config,
        reload: Callable[[], Config] | None = None,
        lockstep: Any = None,
    ) -> None:
        self.config = config
        self._reload = reload  # builds the configuration anew for SIGHUP; may raise
        self._lockstep = lockstep  # distributed mode: rank 0's end (daemon/lockstep.py)
        self.connections: set[Connection] = set()
        # Those of them that have not said hello yet, oldest first.
        self._handshaking: dict[Connection, None] = {}
        self.accepting = True
        self.started_at = time.monotonic()
        self.requests_total = 0
        self.requests_completed = 0
        self.requests_cancelled = 0
        self.requests_failed = 0
        self.exit_code = 0
        self.stalled = False
        self._stop = asyncio.Event()
        self._signals = 0
        self.worker: Worker
        self._http: Any = None
        """The HTTP listener's ``aiohttp.web.AppRunner``, when ``http`` is configured."""

    async def serve(self, socket_path: Path | None = None) -> int:
        path = Path(socket_path or self.config.socket_path).expanduser()
        # Handlers first: a SIGTERM that arrives once the socket exists must drain, not kill.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        inherited = inherited_socket()
        if inherited is not None:
            return await self._serve_inherited(inherited, path)
        # Not for an inherited socket: its folder is the service manager's (the lock beside
        # it is still opened without following links).
        prepare_dir(path.parent)
        # The lock is never released by hand: the kernel frees it as the process exits, so
        # `mlxd stop` (which waits for the lock) returns once the daemon is really gone,
        # not while the interpreter is still tearing down.
        lock = SocketLock(path)
        try:
            sock = bind_unix_socket(path)
        except BaseException:
            lock.release()
            raise
        try:
            return await self._serve_on(sock, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _serve_inherited(self, inherited: InheritedSocket, path: Path) -> int:
        # Socket activation: the file is the service manager's. No bind, chmod or unlink;
        # but still the lock (one daemon per socket) and, on connect, the peer check.
        served = inherited.path or path
        if served != path:
            log.warning("inherited_socket_elsewhere", socket=str(served), configured=str(path))
        log.info("socket_inherited", socket=str(served), manager=inherited.manager)
        SocketLock(served)  # held until the process exits, as above
        return await self._serve_on(inherited.sock, served)

    async def _serve_on(self, sock: Any, path: Path) -> int:
        loop = asyncio.get_running_loop()
        self.worker = Worker(
            self.config,
            LoopOutbox(loop, self._deliver),
            on_death=lambda exc: loop.call_soon_threadsafe(self._worker_died, exc),
            lockstep=self._lockstep,
        )
        self.worker.start()
        if self.config.default_model_name():
            # Warm the default model so the first request does not pay for loading it.
            self.worker.preload(self.config.default_model_name())
        kwargs: dict[str, Any] = {}
        if type(loop).__module__.startswith("uvloop") or sys.version_info >= (3, 13):
            # We unlink our own socket, and never one a service manager lent us: not the
            # loop's job (uvloop, and asyncio from 3.13, would unlink it on close).
            kwargs["cleanup_socket"] = False
        # HTTP listens before the native socket answers: whoever waits for the socket (a
        # service manager, ./dev demo, a test) may then use either.
        if self.config.http:
            from .http_server import start_http  # aiohttp is loaded only when HTTP is on

            try:
                self._http = await start_http(self, self.config.http)
            except OSError as exc:  # the port taken, say: one line and exit 1, as before binding
                from .http_auth import HttpRefused

                reason = exc.strerror or str(exc)
                raise HttpRefused(f"cannot listen on {self.config.http}: {reason}") from None
            log.info("http_serving", listen=self.config.http)
        server = await asyncio.start_unix_server(self._on_connect, sock=sock, **kwargs)
        log.info("serving", socket=str(path), pid=os.getpid())
        watchdog = loop.create_task(self._watch_worker())
        await self._stop.wait()
        watchdog.cancel()
        await self._shutdown(server)
        return self.exit_code

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        uid = peer_uid(writer.get_extra_info("socket"))
        if uid is not None and uid != os.getuid() and not (uid == 0 and self.config.allow_root):
            # The socket's 0600 mode already keeps others out; this holds even if someone
            # loosens it, or the daemon was handed a socket it did not create.
            log.warning("peer_refused", uid=uid)
            conn.send(
                Error(code=errors.PERMISSION_DENIED, message="this daemon serves its owner only")
            )
            await conn.close()
            return
        if (
            self.accepting
            and len(self.connections) >= self.config.max_connections
            and self._handshaking
        ):
            self._make_room()
        if len(self.connections) >= self.config.max_connections or not self.accepting:
            conn.send(Error(code=errors.OVERLOADED, message="too many connections"))
            await conn.close()
            return
        self.connections.add(conn)
        self._handshaking[conn] = None
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self._handshaking.pop(conn, None)

    def greeted(self, conn: Connection) -> None:
        """``conn`` completed its hello: it now holds its place until it closes."""
        self._handshaking.pop(conn, None)

    def _make_room(self) -> None:
        """Full: close the oldest connection still in its handshake, so connections that
        never say hello cannot keep a new client out for as long as they stay open."""
        victim = next(iter(self._handshaking))
        del self._handshaking[victim]
        self.connections.discard(victim)
        log.info("connection_evicted", reason="handshake_pending")
        victim.send(
            Error(
                code=errors.HANDSHAKE_REQUIRED,
                message="no hello yet, and the connection limit is reached",
            )
        )
        victim.writer.close()  # its pending read ends at once; run() cleans up

    def _deliver(self, sink: _Pending, message: Any) -> None:
        if isinstance(message, WorkerStats):
            message = Done(id=sink.request.id, stats=self._stats(message))
        if sink.cancelled and (message := sink.after_cancel(message)) is None:
            return
        conn = sink.conn
        conn.send(message)
        if isinstance(message, Done | Error):
            conn.pending.pop(sink.request.id, None)
            self._finished(sink, message)

    def _finished(self, sink: _Pending, message: Done | Error) -> None:
        if isinstance(message, Error):
            self.requests_failed += 1
        elif message.finish_reason == "cancelled":
            self.requests_cancelled += 1
        else:
            self.requests_completed += 1
        if isinstance(sink.request, Generate):
            model = sink.request.model or self.config.default_model_name()
            api = getattr(sink.conn, "api", "native")
            fields: dict[str, Any] = {"id": sink.request.id, "model": model, "api": api}
            if isinstance(message, Error):
                fields["error"] = message.code
            elif message.usage is not None and message.timings is not None:
                fields |= {
                    "finish_reason": message.finish_reason,
                    "prompt_tokens": message.usage.prompt_tokens,
                    "cached_tokens": message.usage.cached_tokens,
                    "completion_tokens": message.usage.completion_tokens,
                    "queue_s": round(message.timings.queue_s, 4),
                    "ttft_s": round(message.timings.ttft_s, 4),
                    "total_s": round(message.timings.total_s, 4),
                    "tokens_per_s": round(message.timings.tokens_per_s, 1),
                }
            if logs.debug_enabled():
                # Prompts are the user's private data: only at debug level, asked for.
                req = sink.request
                given = (req.prompt, req.messages, req.tokens)
                fields["prompt"] = msgspec.to_builtins(next((p for p in given if p), None))
            log.info("request", **fields)

    def _stats(self, worker: WorkerStats) -> ServerStats:
        return ServerStats(
            uptime_s=time.monotonic() - self.started_at,
            connections=len(self.connections),
            requests_in_flight=sum(len(c.pending) for c in self.connections),
            requests_total=self.requests_total,
            requests_completed=self.requests_completed,
            requests_cancelled=self.requests_cancelled,
            requests_failed=self.requests_failed,
            active_sequences=worker.active_sequences,
            queued=worker.queued,
            tokens_generated=worker.tokens_generated,
            decode_steps=worker.decode_steps,
            prompt_tokens_processed=worker.prompt_tokens_processed,
            sequences_preempted=worker.sequences_preempted,
            tokens_drafted=worker.tokens_drafted,
            tokens_accepted=worker.tokens_accepted,
            models_resident=worker.models_resident,
            memory_active_bytes=worker.memory_active_bytes,
            memory_peak_bytes=worker.memory_peak_bytes,
            worker_alive=self.worker.alive(),
            cache=worker.cache,
            memory=worker.memory,
        )

    def _worker_busy_s(self) -> float:
        snap = self.worker.snapshot
        return 0.0 if snap.idle else max(0.0, time.monotonic() - snap.round_started)

    def _worker_quiet_s(self, stopped_s: float = 0.0) -> float:
        """Seconds since the worker last showed life: a round starting, a model load
        reading another part of its weights. A load that goes on is not a stall.
        ``stopped_s``: time since then that the whole process was stopped, not counted."""
        snap = self.worker.snapshot
        return 0.0 if snap.idle else max(0.0, time.monotonic() - snap.progress_at - stopped_s)

    def health(self) -> Health:
        snap = self.worker.snapshot
        alive = self.worker.alive()
        status = "ok"
        if not alive:
            status = "dead"
        elif self.stalled:
            status = "stalled"
        elif not self.accepting:
            status = "draining"
        return Health(
            status=status,  # type: ignore[arg-type]
            worker_alive=alive,
            worker_busy_s=self._worker_busy_s(),
            queued=snap.queued,
            active_sequences=snap.active_sequences,
            models_resident=list(snap.models_resident),
            uptime_s=time.monotonic() - self.started_at,
        )

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        log.info("signal", signal=sig.name, count=self._signals)
        if self._signals > 1:
            log.warning("forced_exit")
            os._exit(1)
        self._stop.set()

    def _on_reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can change while serving
        (model aliases, limits, log level); an invalid file leaves everything as it was."""
        if self._reload is None:
            log.warning("config_reload_unavailable")
            return
        try:
            new = self._reload()
        except Exception as exc:  # ConfigError, or anything else: never fatal here
            log.error("config_reload_failed", error=str(exc))
            return
        new, fixed = settings.keep_restart_only(self.config, new)
        if fixed:
            log.warning("config_needs_restart", keys=fixed)
        changed = settings.changed_keys(self.config, new)
        self.config = new  # the loop's own limits: read from here by every connection
        logs.setup(new.log_level, new.log_format)
        if hasattr(self, "worker"):
            # Through its inbox: requests submitted after this see the new aliases and limits.
            self.worker.reconfigure(new)
        log.info("config_reloaded", changed=changed)

    def _worker_died(self, exc: BaseException) -> None:
        # Never keep a socket open that nothing will answer (mlx-lm #1472): fail everything
        # in flight and exit non-zero so the service manager restarts the daemon.
        self._fail_all(errors.WORKER_UNAVAILABLE, f"the MLX worker died: {exc!r}")
        self.exit_code = 1
        self._stop.set()

    async def _watch_worker(self) -> None:
        """Turn a stuck worker into an exit, as a dead one is (mlx-lm #1834): a hung MLX call
        cannot be interrupted, so only a restart by the service manager frees the socket."""
        limit = self.config.stall_timeout_s
        interval = min(1.0, limit / 4)
        stops: list[tuple[float, float]] = []  # (when, seconds) the process was stopped
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval)
            overran = time.monotonic() - before - interval
            if overran > interval:
                # This thread slept far past its time: the whole process was stopped
                # (SIGSTOP, Ctrl-Z, a suspended machine), the worker with it. Not its stall.
                log.info("process_was_stopped", stopped_s=round(overran, 1))
                stops.append((before + interval, overran))
            # Only stops since the worker's last sign of life are not its own time.
            progress_at = self.worker.snapshot.progress_at
            stops = [(at, s) for at, s in stops if at >= progress_at]
            busy = self._worker_quiet_s(sum(s for _, s in stops))
            if busy > limit:
                log.critical("worker_stalled", busy_s=round(busy, 1), limit_s=limit)
                self.stalled = True
                self._fail_all(
                    errors.WORKER_UNAVAILABLE,
                    f"the MLX worker has been stuck for {busy:.0f} s; the daemon restarts",
                )
                self.exit_code = 1
                self._stop.set()
                return

    def _fail_all(self, code: str, message: str) -> None:
        for conn in list(self.connections):
            for pending in list(conn.pending.values()):
                self._deliver(pending, Error(id=pending.request.id, code=code, message=message))

    def _in_flight(self) -> int:
        return sum(len(c.pending) for c in self.connections)

    async def _drain(self) -> None:
        """Let what is in flight finish, for up to the grace period; the worker ends the
        rest with ``shutting_down`` when it stops."""
        deadline = time.monotonic() + self.config.shutdown_grace_s
        if self._in_flight():
            log.info("draining", requests=self._in_flight(), grace_s=self.config.shutdown_grace_s)
        while self._in_flight() and time.monotonic() < deadline and self.worker.alive():
            await asyncio.sleep(0.05)

    async def _shutdown(self, server: asyncio.AbstractServer) -> None:
        self.accepting = False
        server.close()  # no new connections; open ones get shutting_down for new requests
        if self.exit_code == 0:
            await self._drain()
        if self.worker.alive() and not self.stalled:
            self.worker.stop()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.worker.join, 30.0)
        await asyncio.sleep(0)  # let the worker's last events reach their connections
        for conn in list(self.connections):
            await conn.close()
        if self._http is not None:
            await self._http.cleanup()
        log.info("stopped", exit_code=self.exit_code)
