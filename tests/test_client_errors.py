"""The Python clients raise only ``MlxdError``\\s: a connection the daemon closed, or a
connect it refused, never surfaces as an OSError, an anyio error or an exception group."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import anyio
import pytest
from conftest import Daemon, short_tmpdir, start_daemon

from mlxd.client import (
    AsyncClient,
    Client,
    ConnectionClosedError,
    MlxdError,
    OverloadedError,
    RequestTimeoutError,
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
