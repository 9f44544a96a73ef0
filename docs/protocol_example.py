"""Writes the byte-level example of docs/PROTOCOL.md from a real exchange with a real daemon.

    .venv/bin/python docs/protocol_example.py           # print the section
    .venv/bin/python docs/protocol_example.py --write   # replace it in docs/PROTOCOL.md

It builds the tiny test model, starts ``mlxd serve`` on a temporary socket, sends ``hello``
and a ``generate`` encoded by the protocol's own encoder, records every frame both ways as
the socket carried them, and prints each one in hex with what its bytes mean.
``annotate`` is also used by tests/test_protocol_doc.py, which checks that the documented
bytes decode as documented.

Threading: a plain script, one thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BEGIN = "<!-- example:begin (written by docs/protocol_example.py) -->"
END = "<!-- example:end -->"
HEX_WIDTH = 16 * 3  # 16 bytes a line


# --------------------------------------------------------------------------- annotating


def _read(buf: bytes, pos: int) -> tuple[Any, int]:
    """One MessagePack value at ``pos``: (value, end). Only the types the protocol uses."""
    b = buf[pos]
    if b <= 0x7F:
        return b, pos + 1
    if b >= 0xE0:
        return b - 0x100, pos + 1
    if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
        n, pos = _length(buf, pos, b, 0x80)
        out = {}
        for _ in range(n):
            key, pos = _read(buf, pos)
            out[key], pos = _read(buf, pos)
        return out, pos
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        n, pos = _length(buf, pos, b, 0x90)
        items = []
        for _ in range(n):
            item, pos = _read(buf, pos)
            items.append(item)
        return items, pos
    if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
        n, pos = _length(buf, pos, b, 0xA0)
        return buf[pos : pos + n].decode(), pos + n
    fixed = {0xC0: None, 0xC2: False, 0xC3: True}
    if b in fixed:
        return fixed[b], pos + 1
    formats = {
        0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
        0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
    }  # fmt: skip
    fmt = formats[b]
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, buf[pos + 1 : pos + 1 + size])[0], pos + 1 + size


def _length(buf: bytes, pos: int, b: int, fix: int) -> tuple[int, int]:
    """The element count or byte length of a map, array or string header, and its end."""
    if fix <= b <= fix + (0x1F if fix == 0xA0 else 0x0F):
        return b - fix, pos + 1
    size = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}[b]
    return int.from_bytes(buf[pos + 1 : pos + 1 + size], "big"), pos + 1 + size


def _line(data: bytes, note: str, indent: int) -> list[str]:
    pad = "  " * indent
    width = HEX_WIDTH - len(pad)
    per_line = (width + 1) // 3
    rows = [data[i : i + per_line] for i in range(0, len(data), per_line)] or [b""]
    out = [f"{pad}{rows[0].hex(' '):<{width}}  {note}"]
    out += [f"{pad}{row.hex(' ')}" for row in rows[1:]]
    return out


def _map_lines(
    buf: bytes, pos: int, indent: int, out: list[str], head: bytes = b"", label: str = ""
) -> int:
    """Appends the lines for the map at ``pos`` (after ``head``, the key that names it) to
    ``out``; returns the map's end."""
    n, body = _length(buf, pos, buf[pos], 0x80)
    out += _line(head + buf[pos:body], f"{label}map of {n}", indent)
    pos = body
    for _ in range(n):
        key, after_key = _read(buf, pos)
        b = buf[after_key]
        if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
            pos = _map_lines(buf, after_key, indent + 1, out, buf[pos:after_key], f'"{key}": ')
            continue
        value, end = _read(buf, after_key)
        shown = json.dumps(value, ensure_ascii=False)
        out += _line(buf[pos:end], f'"{key}": {shown}', indent + 1)
        pos = end
    return pos


def annotate(frame: bytes) -> list[str]:
    """A frame as lines of hex, each saying what its bytes are."""
    (length,) = struct.unpack(">I", frame[:4])
    out = _line(frame[:4], f"length {length}", 0)
    end = _map_lines(frame, 4, 0, out)
    assert end == len(frame) == 4 + length, "one map fills the frame"
    return out


def describe(frame: bytes) -> str:
    """One line for a frame: its direction is added by the caller."""
    value, _ = _read(frame, 4)
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------- recording


def _recv_frame(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("the daemon closed the connection")
            buf += part
        return buf

    header = exactly(4)
    return header + exactly(struct.unpack(">I", header)[0])


def record(socket_path: Path) -> list[tuple[str, bytes]]:
    """(direction, frame) for hello, welcome, generate and every reply to it."""
    from mlxd.protocol import Encoder, Generate, Hello

    encoder = Encoder()
    frames: list[tuple[str, bytes]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(socket_path))
        for request in (
            Hello(protocol=1, client="example"),
            Generate(id=1, prompt="Hi", max_tokens=2),
        ):
            frame = encoder.frame(request)
            sock.sendall(frame)
            frames.append(("client", frame))
            while True:
                reply = _recv_frame(sock)
                frames.append(("server", reply))
                kind = json.loads(describe(reply))["type"]
                if kind in ("welcome", "done", "error"):
                    break
    return frames


def section(frames: list[tuple[str, bytes]]) -> str:
    out = [BEGIN, "", "```"]
    for i, (direction, frame) in enumerate(frames):
        if i:
            out.append("")
        arrow = "client → server" if direction == "client" else "server → client"
        kind = json.loads(describe(frame))["type"]
        out.append(f"{arrow}: {kind} ({len(frame)} bytes)")
        out += annotate(frame)
    out += ["```", "", END]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="replace it in docs/PROTOCOL.md")
    args = parser.parse_args()
    from mlxd.daemon.demo_model import build_demo_model

    tmp = Path(tempfile.mkdtemp(prefix="mlxd-example-", dir="/tmp"))
    daemon = None
    try:
        model = build_demo_model(tmp / "tiny", size="tiny", seed=0)
        sock = tmp / "mlxd.sock"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "mlxd.daemon", "serve", "--socket", str(sock),
             "--model", f"tiny={model}", "--no-cache-persist", "--state-dir", str(tmp / "state"),
             "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.05)
        frames = record(sock)
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    text = section(frames)
    if not args.write:
        print(text)
        return 0
    doc = Path(__file__).resolve().parent / "PROTOCOL.md"
    old = doc.read_text()
    start, stop = old.index(BEGIN), old.index(END) + len(END)
    doc.write_text(old[:start] + text + old[stop:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
