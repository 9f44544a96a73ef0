"""Cancellation, disconnects, bad input and slow readers, against a real daemon."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import msgspec
import pytest
from conftest import Daemon, wait_idle
from helpers import RawConn, reference

from mlxd.client import AsyncClient, UnknownModelError


def test_cancel_mid_stream_ends_it_at_once(daemon: Daemon, tiny_model: Path) -> None:
    conn = RawConn(daemon.socket)
    conn.send({"type": "generate", "id": 1, "prompt": "count:", "max_tokens": 100_000 // 4})
    for _ in range(3):
        assert conn.recv()["type"] == "chunk"
    conn.send({"type": "cancel", "id": 2, "target": 1})
    chunks, end = conn.recv_until_end(1)
    assert end["type"] == "done" and end["finish_reason"] == "cancelled"
    assert end["usage"]["completion_tokens"] < 1000
    # The connection and the daemon serve the next request as before.
    conn.send({"type": "generate", "id": 3, "prompt": "def f(x):", "max_tokens": 16})
    chunks, end = conn.recv_until_end(3)
    assert end["finish_reason"] == "length"
    assert [t for c in chunks for t in c["tokens"]] == reference(tiny_model, "def f(x):", 16)[1]
    conn.close()
    with daemon.client() as client:
        wait_idle(client)


def test_disconnect_mid_stream_cancels_the_request(daemon: Daemon) -> None:
    with daemon.client() as client:
        before = client.stats().requests_cancelled
    conn = RawConn(daemon.socket)
    conn.send({"type": "generate", "id": 1, "prompt": "count:", "max_tokens": 30_000})
    assert conn.recv()["type"] == "chunk"
    conn.close()
    with daemon.client() as client:
        wait_idle(client)
        stats = client.stats()
        assert stats.requests_cancelled == before + 1
        assert client.generate("ok", max_tokens=4).done.finish_reason == "length"


async def test_leaving_a_stream_early_cancels_it(daemon: Daemon) -> None:
    async with AsyncClient(daemon.socket) as client:
        before = (await client.stats()).requests_cancelled
        n = 0
        async for _ in client.stream("count:", max_tokens=30_000):
            n += 1
            if n == 3:
                break
        for _ in range(200):
            stats = await client.stats()
            if stats.active_sequences == 0 and stats.requests_in_flight <= 1:
                break
            time.sleep(0.01)
        assert stats.active_sequences == 0
        assert stats.requests_cancelled == before + 1


def test_bad_frames_get_typed_errors_and_others_stream_on(daemon: Daemon, tiny_model: Path) -> None:
    # Another client's long stream runs throughout.
    result: dict[str, object] = {}

    def bystander() -> None:
        with daemon.client() as c:
            result["done"] = c.generate("def bystander():", max_tokens=600)

    t = threading.Thread(target=bystander)
    t.start()

    conn = RawConn(daemon.socket)
    conn.send_frame(b"\xc1")  # a byte MessagePack never uses
    assert conn.recv()["code"] == "invalid_message"
    conn.send_frame(msgspec.msgpack.encode([1, 2, 3]))
    assert conn.recv()["code"] == "invalid_message"
    conn.send({"type": "teleport", "id": 5})
    assert conn.recv() == {
        "type": "error",
        "id": 5,
        "code": "unknown_message_type",
        "message": "unknown message type 'teleport'",
    }
    conn.send({"type": "cancel", "id": 6})
    err = conn.recv()
    assert (err["code"], err["id"], err["field"]) == ("invalid_request", 6, "$.target")
    conn.send({"type": "generate", "id": "seven", "prompt": "x"})
    assert conn.recv()["code"] == "invalid_request"
    conn.send({"type": "generate", "id": 8, "prompt": "héllo → 世界", "max_tokens": 2})
    assert conn.recv_until_end(8)[1]["type"] == "done"  # non-ASCII is fine
    conn.send_frame(b"\x81\xa4type\xa8gen\xffrate")  # {"type": <8 bytes, not UTF-8>}
    assert conn.recv()["code"] == "invalid_message"
    conn.send({"type": "generate", "id": 9, "prompt": "x", "model": "no-such-model"})
    assert conn.recv()["code"] == "unknown_model"
    conn.send({"type": "generate", "id": 10, "prompt": "x", "tokens": [1, 2]})
    assert conn.recv()["code"] == "invalid_request"
    conn.send({"type": "ping", "id": 11})
    assert conn.recv() == {"type": "done", "id": 11}
    conn.close()

    # Broken framing: an error, then the connection is closed.
    for header in (struct.pack(">I", 0), struct.pack(">I", 2**32 - 1)):
        conn = RawConn(daemon.socket)
        conn.sock.sendall(header)
        assert conn.recv()["code"] in ("invalid_frame", "frame_too_large")
        assert conn.is_closed_by_peer()
        conn.close()

    t.join(60)
    done = result["done"]
    assert (done.text, done.tokens) == reference(tiny_model, "def bystander():", 600)  # type: ignore[attr-defined]


def test_handshake_is_required_and_versioned(daemon: Daemon) -> None:
    conn = RawConn(daemon.socket, hello=False)
    conn.send({"type": "ping", "id": 1})
    assert conn.recv()["code"] == "handshake_required"
    assert conn.is_closed_by_peer()
    conn = RawConn(daemon.socket, hello=False)
    conn.send({"type": "hello", "protocol": 99})
    assert conn.recv()["code"] == "unsupported_version"
    assert conn.is_closed_by_peer()


def test_duplicate_request_id_is_refused(daemon: Daemon) -> None:
    conn = RawConn(daemon.socket)
    conn.send({"type": "generate", "id": 1, "prompt": "a", "max_tokens": 5000})
    conn.send({"type": "generate", "id": 1, "prompt": "b", "max_tokens": 5})
    while (m := conn.recv())["type"] == "chunk":
        pass
    assert (m["type"], m["code"], m["id"]) == ("error", "duplicate_id", 1)
    conn.send({"type": "cancel", "id": 2, "target": 1})
    assert conn.recv_until_end(1)[1]["finish_reason"] == "cancelled"
    conn.close()


def test_a_slow_reader_stalls_no_one_and_loses_nothing(daemon: Daemon, tiny_model: Path) -> None:
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(str(daemon.socket))
    conn = RawConn.__new__(RawConn)
    conn.sock = slow
    slow.settimeout(60)
    conn.send({"type": "hello", "protocol": 1})
    assert conn.recv()["type"] == "welcome"
    conn.send({"type": "generate", "id": 1, "prompt": "slow reader:", "max_tokens": 3000})
    # While the slow reader reads nothing, another client is served in full.
    with daemon.client() as client:
        t0 = time.monotonic()
        other = client.generate("def other():", max_tokens=50)
        assert other.tokens == reference(tiny_model, "def other():", 50)[1]
        assert time.monotonic() - t0 < 30
    time.sleep(1.0)
    chunks, end = conn.recv_until_end(1)
    text, ids = reference(tiny_model, "slow reader:", 3000)
    assert [t for c in chunks for t in c["tokens"]] == ids
    assert "".join(c["text"] for c in chunks) == text
    assert end["finish_reason"] in ("length", "stop")
    conn.close()


def test_unknown_model_raises_typed_error(daemon: Daemon) -> None:
    with daemon.client() as client, pytest.raises(UnknownModelError) as info:
        client.generate("x", model="../../etc")
    assert info.value.code == "unknown_model"
