"""Test helpers: mlx-lm's own in-process reference outputs, a raw protocol connection,
waiting for the daemon's counters, and the ``mlxd`` command run in a clean environment."""

from __future__ import annotations

import functools
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h11  # httpcore's, under the openai SDK: an HTTP/1.1 client with nothing hidden
import msgspec

from mlxd.client import Client

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLXD_")}
"""This environment less every ``MLXD_*`` variable: no stray setting reaches a command."""


def mlxd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``mlxd ARGS`` run to its end, in ``CLEAN_ENV`` plus ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", *args],
        capture_output=True, text=True, timeout=120, env={**CLEAN_ENV, **(env or {})},
    )  # fmt: skip


@functools.cache
def _load(model_dir: str) -> tuple[Any, Any]:
    from mlx_lm import load

    return load(model_dir)


def reference(model_dir: Path, prompt: str | list[int], max_tokens: int) -> tuple[str, list[int]]:
    """mlx-lm's greedy output for ``prompt``, in this process: (text, token ids).

    Text comes from ``mlx_lm.generate``; ids from ``stream_generate``, less a final EOS
    (the daemon does not send EOS ids, as mlx-lm's text leaves them out).
    """
    from mlx_lm import generate, stream_generate

    model, tokenizer = _load(str(model_dir))
    text = generate(model, tokenizer, prompt, max_tokens=max_tokens)
    ids, finish = [], None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        ids.append(r.token)
        finish = r.finish_reason
    if finish == "stop" and ids and ids[-1] in tokenizer.eos_token_ids:
        ids.pop()
    return text, ids


def reference_logprobs(
    model_dir: Path, prompt: list[int], generated: list[int], bias: dict[int, float] | None = None
) -> list[list[float]]:
    """mlx-lm's log-softmax over the vocabulary at each generated token's step, in this
    process: the model run once over the prompt and the tokens before it, in its own dtype
    (as mlx-lm's generators compute it), ``bias`` added as its ``logit_bias`` processor does."""
    import mlx.core as mx

    model, _ = _load(str(model_dir))
    logits = model(mx.array([prompt + generated[:-1]]))[0, len(prompt) - 1 :, :]
    if bias:
        keys = mx.array(list(bias))
        logits[:, keys] += mx.array(list(bias.values()), dtype=logits.dtype)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return logprobs.astype(mx.float32).tolist()


def chat_tokens(model_dir: Path, messages: list[dict[str, str]]) -> list[int]:
    _, tokenizer = _load(str(model_dir))
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def fim_tokens(model_dir: Path, prefix: str, suffix: str) -> list[int]:
    """A FIM prompt for a demo model, assembled independently of the daemon: PSM order, no
    BOS (the demo tokenizers add none to plain prompts)."""
    _, tokenizer = _load(str(model_dir))
    pre, suf, mid = tokenizer.convert_tokens_to_ids(
        ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    )
    assert tokenizer.encode("", add_special_tokens=True) == []
    return [
        pre,
        *tokenizer.encode(prefix, add_special_tokens=False),
        suf,
        *tokenizer.encode(suffix, add_special_tokens=False),
        mid,
    ]


class RawConn:
    """A protocol connection with nothing hidden: frames go out as given."""

    def __init__(self, path: Path, hello: bool = True, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        if hello:
            self.send({"type": "hello", "protocol": 1})
            welcome = self.recv()
            assert welcome["type"] == "welcome", welcome

    def send_frame(self, payload: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def send(self, message: dict[str, Any]) -> None:
        self.send_frame(msgspec.msgpack.encode(message))

    def recv(self) -> dict[str, Any]:
        header = self._exactly(4)
        return msgspec.msgpack.decode(self._exactly(struct.unpack(">I", header)[0]))

    def recv_until_end(self, request_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Chunks of ``request_id``, then its done or error."""
        chunks = []
        while True:
            m = self.recv()
            if m.get("id") != request_id:
                continue
            if m["type"] == "chunk":
                chunks.append(m)
            else:
                return chunks, m

    def is_closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("closed by the daemon")
            buf += part
        return buf

    def close(self) -> None:
        self.sock.close()


class UnreadHttpStream:
    """A streamed POST to the HTTP API on the Unix socket ``path``, from a client that
    reads nothing (a 4 KiB receive buffer) until ``events``, which reads it all."""

    def __init__(self, path: Path, target: str, request: dict[str, Any]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(120)
        self.sock.connect(str(path))
        body = json.dumps(request).encode()
        self._conn = h11.Connection(h11.CLIENT)
        headers = [("Host", "mlxd"), ("Content-Type", "application/json"),
                   ("Content-Length", str(len(body))), ("Connection", "close")]  # fmt: skip
        send = self._conn.send
        self.sock.sendall(send(h11.Request(method="POST", target=target, headers=headers)))
        self.sock.sendall(send(h11.Data(data=body)) + send(h11.EndOfMessage()))

    def events(self) -> list[dict[str, Any]]:
        """Read the whole reply (it must be a 200): its server-sent events' JSON, in order,
        less the final ``[DONE]``."""
        raw = b""
        while chunk := self.sock.recv(65536):
            raw += chunk
        self.sock.close()
        self._conn.receive_data(raw)
        self._conn.receive_data(b"")
        data = b""
        while not isinstance(event := self._conn.next_event(), h11.EndOfMessage | h11.PAUSED):
            if isinstance(event, h11.Response):
                assert event.status_code == 200
            elif isinstance(event, h11.Data):
                data += event.data
        return [json.loads(line[6:]) for line in data.decode().splitlines()
                if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip


def wait_for(client: Client, check: Any, timeout: float = 120) -> Any:
    """Poll ``client.stats()`` until ``check(stats)`` holds; those stats, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.stats()
        if check(stats):
            return stats
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout} s: {client.stats()}")
