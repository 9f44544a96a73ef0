"""Model loading progress: ``progress`` messages to the request that waits on a load, the
clients that skip them (or pass them on), and the CLI's report on stderr.

The tiny test model is read in a step or two; these tests load the larger "demo" model
(~8.5 MiB of weights, built by the project's builder in about a second), which is read in
about ten groups, so there are steps in between to see.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import RawConn, reference

from mlxd.client import AsyncClient, Client, Progress
from mlxd.daemon.models import LOAD_STEPS

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def big_model(models_root: Path) -> Path:
    from mlxd.daemon.demo_model import build_demo_model

    return build_demo_model(models_root / "demo", size="demo", seed=0)


@pytest.fixture(scope="module")
def progress_daemon(big_model: Path, tiny_model: Path) -> Iterator[Daemon]:
    # The default model (preloaded at start) is the tiny one: "big" loads when asked.
    d = start_daemon(
        short_tmpdir() / "mlxd.sock",
        "--model",
        f"big={big_model}",
        "--model",
        f"tiny={tiny_model}",
        "--default-model",
        "tiny",
        "--no-cache-persist",
    )
    yield d
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert code == 0, d.log()


@pytest.fixture
def unloaded(progress_daemon: Daemon) -> Daemon:
    """The daemon with "big" not resident, whatever the test before did."""
    with progress_daemon.client() as client:
        client.unload("big")
    return progress_daemon


def tensor_bytes(model_dir: Path) -> int:
    """The bytes of every tensor in the model's safetensors files, read from their headers
    (an 8-byte little-endian length, then JSON with each tensor's data offsets)."""
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        total += sum(end - start for start, end in (t["data_offsets"] for t in header.values()))
    return total


def until_end(conn: RawConn, request_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every message of ``request_id`` in order, and its end (done or error)."""
    messages = []
    while True:
        m = conn.recv()
        if m.get("id") != request_id:
            continue
        if m["type"] in ("done", "error"):
            return messages, m
        messages.append(m)


def check_progress(progress: list[dict[str, Any]], model: str, total: int) -> None:
    """The shape every load's progress has: from 0 to the total, never backwards, bounded."""
    assert len(progress) >= 2, progress
    assert len(progress) <= LOAD_STEPS + 2, progress
    assert all(p["stage"] == "loading" and p["model"] == model for p in progress)
    assert all(p["total_bytes"] == total for p in progress)
    done = [p["done_bytes"] for p in progress]
    assert done[0] == 0 and done[-1] == total
    assert done == sorted(done)


def test_load_reports_progress_then_done(unloaded: Daemon, big_model: Path) -> None:
    conn = RawConn(unloaded.socket)
    try:
        conn.send({"type": "load", "id": 1, "model": "big"})
        messages, end = until_end(conn, 1)
        assert end["type"] == "done", end
        assert {m["type"] for m in messages} == {"progress"}
        weights = end["model"]["bytes"]
        # What is reported is the weights in memory: the model info's bytes, which for
        # these unquantized float16 files is every tensor they hold.
        assert weights == tensor_bytes(big_model) > 8 * 2**20
        check_progress(messages, "big", weights)
        # The demo model is read in several groups: there are steps between 0 and done.
        assert len(messages) > 3

        # Resident now: a load has nothing to report.
        conn.send({"type": "load", "id": 2, "model": "big"})
        messages, end = until_end(conn, 2)
        assert end["type"] == "done" and messages == []
    finally:
        conn.close()


def test_generate_on_an_unloaded_model_gets_progress_before_its_first_chunk(
    unloaded: Daemon, big_model: Path
) -> None:
    conn = RawConn(unloaded.socket)
    try:
        conn.send({"type": "generate", "id": 7, "model": "big", "prompt": PROMPT, "max_tokens": 16})
        messages, end = until_end(conn, 7)
        assert end["type"] == "done", end
        kinds = [m["type"] for m in messages]
        first_chunk = kinds.index("chunk")
        assert set(kinds[:first_chunk]) == {"progress"}
        assert "progress" not in kinds[first_chunk:]
        with unloaded.client() as client:
            weights = next(m.bytes for m in client.models() if m.name == "big")
        check_progress(messages[:first_chunk], "big", weights)
        text = "".join(m["text"] for m in messages[first_chunk:])
        assert text == reference(big_model, PROMPT, 16)[0]
    finally:
        conn.close()


def test_warm_on_an_unloaded_model_reports_progress(unloaded: Daemon) -> None:
    conn = RawConn(unloaded.socket)
    try:
        conn.send({"type": "warm", "id": 3, "model": "big", "prompt": PROMPT})
        messages, end = until_end(conn, 3)
        assert end["type"] == "done", end
        progress = [m for m in messages if m["type"] == "progress"]
        check_progress(progress, "big", progress[-1]["total_bytes"])
    finally:
        conn.close()


def test_the_sync_client_skips_progress_or_hands_it_over(unloaded: Daemon, big_model: Path) -> None:
    expected = reference(big_model, PROMPT, 12)
    with unloaded.client() as client:
        result = client.generate(PROMPT, model="big", max_tokens=12)
        assert (result.text, result.tokens) == expected
        assert result.done.finish_reason == "length"

        client.unload("big")
        heard: list[Progress] = []
        info = client.load("big", on_progress=heard.append)
        check_progress([msgspec.to_builtins(p) for p in heard], "big", info.bytes)
        assert all(p.id == heard[0].id for p in heard)


async def test_the_async_client_skips_progress_or_hands_it_over(
    unloaded: Daemon, big_model: Path
) -> None:
    expected = reference(big_model, PROMPT, 12)
    async with AsyncClient(unloaded.socket) as client:
        result = await client.generate(PROMPT, model="big", max_tokens=12)
        assert (result.text, result.tokens) == expected

        await client.unload("big")
        heard: list[Progress] = []
        stream = client.stream(PROMPT, model="big", max_tokens=12, on_progress=heard.append)
        async with stream:
            text = "".join([chunk.text async for chunk in stream])
        assert text == expected[0]
        assert stream.progress is not None and stream.progress == heard[-1]
        total = heard[-1].total_bytes
        check_progress([msgspec.to_builtins(p) for p in heard], "big", total)

        await client.unload("big")
        heard.clear()
        info = await client.load("big", on_progress=heard.append)
        assert heard[-1].done_bytes == heard[-1].total_bytes == info.bytes


def mlxd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_load_prints_the_final_progress_line_on_stderr(unloaded: Daemon) -> None:
    out = mlxd("load", "big", "--socket", str(unloaded.socket))
    assert out.returncode == 0, out.stderr
    # Not a terminal: no bar, only the final line.
    assert out.stderr == "loading big: 100% (8.5 MiB / 8.5 MiB)\n"
    assert out.stdout.startswith("big\tresident 8.5 MiB\t")
    again = mlxd("load", "big", "--socket", str(unloaded.socket))
    assert again.returncode == 0 and again.stderr == ""  # resident: nothing was loaded


def test_cli_generate_keeps_stdout_the_text_while_its_model_loads(
    unloaded: Daemon, big_model: Path
) -> None:
    out = mlxd(
        "generate", "--socket", str(unloaded.socket), "--model", "big", "--max-tokens", "10", PROMPT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == reference(big_model, PROMPT, 10)[0] + "\n"
    assert out.stderr == ""  # the bar is for terminals only


def test_the_cli_bar_on_a_terminal(unloaded: Daemon) -> None:
    """``mlxd load`` with stderr on a pseudo-terminal redraws one bar in place, then ends
    its line; stdout (a pipe here) gets only the model's line."""
    main, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlxd.daemon", "load", "big", "--socket", str(unloaded.socket)],
            stdout=subprocess.PIPE,
            stderr=secondary,
        )
    finally:
        os.close(secondary)
    drawn = b""
    try:
        while True:
            try:
                part = os.read(main, 4096)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not part:
                break
            drawn += part
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(main)
    assert proc.returncode == 0
    assert stdout.startswith(b"big\tresident")
    text = drawn.decode().replace("\r\n", "\n")  # the terminal translates newlines
    frames = [f for f in text.split("\r") if f]
    assert len(frames) >= 2
    assert frames[0].startswith("loading big [" + "-" * 30 + "]   0%  0 B / 8.5 MiB")
    assert frames[-1].startswith("loading big [" + "#" * 30 + "] 100%  8.5 MiB / 8.5 MiB")
    assert text.endswith("\n") and text.count("\n") == 1


class _ScriptedPeer:
    """A socket that answers like a newer daemon of protocol 1: its replies to a ping
    carry a message type this client has never heard of before the ``done``."""

    def __init__(self) -> None:
        self.path = short_tmpdir() / "peer.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, conn: socket.socket, message: dict[str, Any]) -> None:
        payload = msgspec.msgpack.encode(message)
        conn.sendall(struct.pack(">I", len(payload)) + payload)

    def _recv(self, conn: socket.socket) -> dict[str, Any]:
        (n,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
        return msgspec.msgpack.decode(conn.recv(n, socket.MSG_WAITALL))

    def _serve(self) -> None:
        for _ in range(2):  # the sync client, then the async one
            conn, _ = self.server.accept()
            with conn:
                self._recv(conn)
                welcome = {"type": "welcome", "protocol": 1, "server": "x", "max_frame_bytes": 1024}
                self._send(conn, welcome)
                ping = self._recv(conn)
                self._send(conn, {"type": "hologram", "id": ping["id"], "anything": [1, 2]})
                self._send(conn, {"type": "done", "id": ping["id"]})
                conn.recv(1)  # until the client hangs up

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.path.parent, ignore_errors=True)


async def test_the_clients_ignore_message_types_they_do_not_know() -> None:
    peer = _ScriptedPeer()
    try:
        with Client(peer.path, timeout=10) as client:
            assert client.ping() >= 0
        async with AsyncClient(peer.path) as aclient:
            with anyio.fail_after(10):
                assert await aclient.ping() >= 0
    finally:
        peer.close()
