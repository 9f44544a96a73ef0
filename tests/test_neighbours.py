"""One client must not hold up the others: silent connections and huge prompts, against a
real daemon (issue 13, items 13 and 15)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from conftest import short_tmpdir, start_daemon
from helpers import RawConn, reference


def test_silent_connections_neither_lock_others_out_nor_stay(tiny_model: Path) -> None:
    base = short_tmpdir()
    d = start_daemon(
        base / "mlxd.sock",
        "--model", f"tiny={tiny_model}",
        "--max-connections", "4",
        "--handshake-timeout", "3",
    )  # fmt: skip
    silent: list[socket.socket] = []
    try:
        for _ in range(4):  # every place taken by connections that never say hello
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(60)
            s.connect(str(d.socket))
            silent.append(s)
        # A real client still gets in at once (the oldest silent one makes room) and is served.
        with d.client() as client:
            done = client.generate("def f():", max_tokens=8)
            assert done.tokens == reference(tiny_model, "def f():", 8)[1]
        # Each silent connection is told why, then closed: made room, or out of time.
        messages = []
        for s in silent:
            conn = RawConn.__new__(RawConn)
            conn.sock = s
            error = conn.recv()
            assert error["code"] == "handshake_required", error
            messages.append(error["message"])
            assert conn.is_closed_by_peer()
        assert "the connection limit is reached" in messages[0]  # the oldest made room
        assert messages[1:] == ["no hello within 3 s"] * 3
        # Their places are free again: as many real clients as the limit, at once.
        clients = [RawConn(d.socket) for _ in range(4)]
        for i, c in enumerate(clients):
            c.send({"type": "ping", "id": i})
            assert c.recv() == {"type": "done", "id": i}
            c.close()
    finally:
        for s in silent:
            s.close()
        code = d.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert code == 0, d.log()
