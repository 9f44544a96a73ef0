"""The Python clients raise only ``MlxdError``\\s: a connection the daemon closed, or a
connect it refused, never surfaces as an OSError, an anyio error or an exception group."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
import traceback
from pathlib import Path

import anyio
import pytest
from conftest import Daemon, short_tmpdir, start_daemon, wait_idle

from mlxd.client import (
    AsyncClient,
    Client,
    ConnectionClosedError,
    DaemonUnavailableError,
    InvalidRequestError,
    MlxdError,
    OverloadedError,
    RequestTimeoutError,
    UnknownModelError,
)


async def test_a_request_after_the_daemon_closed_the_connection_is_connection_closed(
    tiny_model: Path,
) -> None:
    base = short_tmpdir()
    d = start_daemon(base / "mlxd.sock", "--model", f"tiny={tiny_model}")
    try:
        sync = d.client()
        assert sync.ping() >= 0
        async with AsyncClient(d.socket) as aio:
            assert await aio.ping() >= 0
            # Blocking here, so the async client's reader has not yet seen the close when
            # the next request is written: the write meets it first.
            assert d.stop() == 0
            with anyio.fail_after(30):
                with pytest.raises(ConnectionClosedError):
                    await aio.ping()
                with pytest.raises(ConnectionClosedError):
                    async for _ in aio.stream("hi", max_tokens=4):
                        pass
                with pytest.raises(ConnectionClosedError):
                    await aio.generate("hi", max_tokens=4)
        with pytest.raises(ConnectionClosedError):
            sync.ping()
        with pytest.raises(ConnectionClosedError):
            sync.generate("hi", max_tokens=4)
        sync.close()
    finally:
        d.stop()
        shutil.rmtree(base)


def held_place(d: Daemon) -> Client:
    """The daemon's one connection place; the start-up probe's may still be closing."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return d.client()
        except OverloadedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def test_a_refused_connect_is_always_the_daemons_error(tiny_model: Path) -> None:
    base = short_tmpdir()
    d = start_daemon(base / "mlxd.sock", "--model", f"tiny={tiny_model}", "--max-connections", "1")
    try:
        with held_place(d) as held:  # the one place: every other connect is refused
            assert held.ping() >= 0
            # A hello bigger than the socket's buffer cannot be sent before the daemon has
            # refused and closed: the write always meets the close (EPIPE), and the client
            # must still read the refusal. Then plain hellos, which race the close.
            names = ["x" * (1 << 20)] * 3 + ["mlxd.client"] * 20
            for name in names:
                with pytest.raises(OverloadedError):
                    Client(d.socket, timeout=30, name=name)
            for name in names:
                with anyio.fail_after(30), pytest.raises(OverloadedError):
                    async with AsyncClient(d.socket, name=name):
                        pass
            assert held.ping() >= 0
    finally:
        assert d.stop() == 0
        shutil.rmtree(base)


def test_the_blocking_clients_timeout_is_an_mlxd_error_and_closes() -> None:
    # A server that accepts and never answers: the hello's reply never comes.
    base = short_tmpdir()
    path = base / "mlxd.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        with pytest.raises(RequestTimeoutError) as raised:
            Client(path, timeout=0.5)
        assert raised.value.code == "timeout"
        assert isinstance(raised.value, MlxdError) and isinstance(raised.value, TimeoutError)
    finally:
        server.close()
        shutil.rmtree(base)


async def test_a_socket_path_too_long_for_a_unix_socket_is_said_so() -> None:
    # connect() would fail with "no such file": the client says what is wrong instead.
    from mlxd.protocol.paths import SUN_PATH_BYTES

    path = Path("/tmp") / ("m" * SUN_PATH_BYTES) / "mlxd.sock"
    with pytest.raises(DaemonUnavailableError) as raised:
        Client(path)
    assert f"at most {SUN_PATH_BYTES - 1}" in raised.value.message, raised.value.message
    with pytest.raises(DaemonUnavailableError) as raised:
        async with AsyncClient(path):
            pass
    assert f"{len(str(path))} bytes" in raised.value.message, raised.value.message


# ---------------------------------------------------------------- nothing wrapped in a group
# The async client's reader runs in a task group entered by ``async with``; that group must
# not wrap what leaves the block (issue 15, item 9).


async def test_an_mlxd_error_leaves_async_with_as_it_is(daemon: Daemon) -> None:
    with pytest.raises(UnknownModelError) as raised:
        async with AsyncClient(daemon.socket) as client:
            await client.load("no-such-model")
    assert type(raised.value) is UnknownModelError and raised.value.code == "unknown_model"
    # Its own traceback, down to where the client raised it.
    frames = [f.name for f in traceback.extract_tb(raised.value.__traceback__)]
    assert "load" in frames and "_call" in frames, frames
    with pytest.raises(InvalidRequestError) as invalid:
        async with AsyncClient(daemon.socket) as client:
            async for _ in client.stream("hi", max_tokens=10**9):
                pass
    assert type(invalid.value) is InvalidRequestError and invalid.value.code == "invalid_request"


async def test_the_callers_own_exception_leaves_async_with_as_it_is(daemon: Daemon) -> None:
    mine = ValueError("mine")
    with pytest.raises(ValueError) as raised:
        async with AsyncClient(daemon.socket) as client:
            await client.ping()
            raise mine
    assert raised.value is mine
    # Also one raised while a stream is in flight (the reader still routing its chunks).
    with pytest.raises(KeyError):
        async with AsyncClient(daemon.socket) as client:
            async for _ in client.stream("def f(", max_tokens=1000):
                raise KeyError("mine")
    with daemon.client() as c:
        wait_idle(c)  # the daemon ended that request when the connection closed


async def test_cancelling_and_timeouts_around_async_with_still_behave(daemon: Daemon) -> None:
    async def first_chunk_then_wait(client: AsyncClient, scope: anyio.CancelScope | None) -> None:
        async for _ in client.stream("def f(", max_tokens=30000):
            if scope is not None:
                scope.cancel()
            await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        async with AsyncClient(daemon.socket) as client:
            await first_chunk_then_wait(client, scope)
    assert scope.cancelled_caught
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.5):
            async with AsyncClient(daemon.socket) as client:
                await first_chunk_then_wait(client, None)

    async def in_a_task() -> None:
        async with AsyncClient(daemon.socket) as client:
            await first_chunk_then_wait(client, None)

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(in_a_task(), 0.5)
    task = asyncio.ensure_future(in_a_task())
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with daemon.client() as c:
        wait_idle(c)  # each cancelled request ended on the daemon too
    async with AsyncClient(daemon.socket) as client:
        assert await client.ping() >= 0
