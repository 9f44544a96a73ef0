"""One client must not hold up the others: silent connections and huge prompts, against a
real daemon (issue 13, items 13 and 15)."""

from __future__ import annotations

import json
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from conftest import Daemon, short_tmpdir, start_daemon
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


def test_the_byte_bound_never_exceeds_the_real_token_count(tiny_model: Path) -> None:
    from mlx_lm.tokenizer_utils import _byte_decoder, load

    from mlxd.daemon.prompts import least_tokens, max_token_bytes
    from mlxd.protocol import Generate

    tokenizer = load(tiny_model)
    longest = max_token_bytes(tokenizer)
    assert longest is not None
    # L is at least the bytes of every token: each one's vocabulary string, byte-decoded.
    decoder = _byte_decoder()
    added = set(tokenizer._tokenizer.get_added_vocab())
    for token in tokenizer._tokenizer.get_vocab():
        size = len(token.encode()) if token in added else len(bytes(decoder[c] for c in token))
        assert size <= longest, token
    # The tightest text: the longest token over and over, and ordinary text.
    vocab = tokenizer._tokenizer.get_vocab()
    top = max((t for t in vocab if t not in added), key=len)
    tight = tokenizer.decode([vocab[top]] * 200)
    for text in (tight, "def f(x):\n    return x * 2\n" * 300, "ünïcødé ✓ " * 200):
        req = Generate(id=1, prompt=text)
        assert 0 < least_tokens(req, longest) <= len(tokenizer.encode(text))


def test_a_prompt_over_the_limit_by_its_size_alone_is_refused_untokenized(
    daemon: Daemon, tiny_model: Path
) -> None:
    from mlx_lm.tokenizer_utils import load

    from mlxd.daemon.prompts import max_token_bytes

    longest = max_token_bytes(load(tiny_model))
    assert longest is not None
    conn = RawConn(daemon.socket)
    # Just over the tiny model's 4096-token context by its bytes alone.
    text = "x" * (4096 * longest)
    conn.send({"type": "generate", "id": 1, "prompt": text, "max_tokens": 1})
    _, end = conn.recv_until_end(1)
    assert end["code"] == "prompt_too_long", end
    assert "at least 4096 tokens" in end["message"]  # the bound, not a token count
    conn.send({"type": "generate", "id": 2, "tokens": [5] * 4096, "max_tokens": 1})
    _, end = conn.recv_until_end(2)
    assert end["code"] == "prompt_too_long", end
    conn.close()


def test_a_client_that_leaves_takes_its_queued_big_prompts_with_it(tiny_model: Path) -> None:
    base = short_tmpdir()
    # The tiny model with a context long enough that 2 MiB prompts pass the size bound.
    model = base / "long"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1 << 24}))
    d = start_daemon(
        base / "mlxd.sock",
        "--model", f"long={model}",
        # Past the bound, a 2 MiB prompt's ~1.8M tokens are refused for their KV state.
        "--memory-budget", "256M",
    )  # fmt: skip
    try:
        table = bytes(b"abcdefghijklmnopqrstuvwxyz ()=\n"[i % 31] for i in range(256))
        rng = random.Random(0)
        # A cancel reaches a request being tokenized, or waiting to be, as it does others.
        editor = RawConn(d.socket, timeout=300)
        for rid in (1, 2):
            text = rng.randbytes(2 << 20).translate(table).decode()
            editor.send({"type": "generate", "id": rid, "prompt": text, "max_tokens": 1})
        for rid in (1, 2):
            editor.send({"type": "cancel", "id": 10 + rid, "target": rid})
        ends: dict[int, dict[str, Any]] = {}
        while len(ends) < 2:  # in either order: the second may end first, never tokenized
            m = editor.recv()
            if m.get("id") in (1, 2) and m["type"] in ("done", "error"):
                ends[m["id"]] = m
        for end in ends.values():
            assert (end["type"], end.get("finish_reason")) == ("done", "cancelled"), end
        editor.close()
        hog = RawConn(d.socket, timeout=300)
        ids = range(100, 106)
        for rid in ids:  # seconds of tokenizing each, then insufficient_memory
            text = rng.randbytes(2 << 20).translate(table).decode()
            hog.send({"type": "generate", "id": rid, "prompt": text, "max_tokens": 1})
        hog.close()  # gone: what it left queued goes with it
        with d.client() as client:
            assert client.generate("def f():", max_tokens=8).done.finish_reason == "length"
        deadline = time.monotonic() + 300
        while len(lines := _request_lines(d, ids)) < len(ids):
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.2)
        # At most the one being tokenized when the client left (or the next, had it been
        # taken before the disconnect was seen) was tokenized (cancelled with its prompt
        # tokens counted, or refused); the others never were (cancelled, 0 tokens).
        tokenized = [e for e in lines if e.get("error") or e.get("prompt_tokens")]
        assert len(tokenized) <= 2, lines
        assert all(e.get("finish_reason") == "cancelled" for e in lines if e not in tokenized)
    finally:
        code = d.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert code == 0, d.log()


def _request_lines(d: Daemon, ids: range) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == "request" and e.get("id") in ids]
