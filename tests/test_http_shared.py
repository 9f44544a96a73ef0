"""What every HTTP API shares: a dropped stream is cancelled, 16 streams run side by side,
HTTP-level bad input (no such endpoint, wrong method, an oversized body) gets a JSON error,
overloaded is 503 with Retry-After, and a witness native stream goes on token for token.

The streaming tests use ``POST /v1/completions`` (openai_api.py).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import HttpDaemon, start_http_daemon, wait_idle
from helpers import reference

from mlxd.client import Chunk, Client, OverloadedError

PROMPTS = [f"story {i}: once upon a time there was a" for i in range(16)]


def need_completions(base_url: str) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1, "temperature": 0}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


def read_sse(r: httpx.Response) -> Iterator[dict]:
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


@pytest.fixture(scope="module")
def small_daemon(tiny_model: Path) -> Iterator[HttpDaemon]:
    """Small limits: a 64 KiB frame (and body), 3 connections."""
    d = start_http_daemon(
        "--model", f"tiny={tiny_model}", "--default-model", "tiny",
        "--max-frame-bytes", "64K", "--max-connections", "3",
    )  # fmt: skip
    yield d
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert code == 0, d.log()


class Witness:
    """A native greedy stream run in a thread while the test does its worst over HTTP."""

    def __init__(self, daemon: HttpDaemon, prompt: str, max_tokens: int) -> None:
        self.prompt, self.max_tokens = prompt, max_tokens
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(daemon,))
        self._started = threading.Event()
        self._thread.start()
        assert self._started.wait(60), "the witness stream never started"

    def _run(self, daemon: HttpDaemon) -> None:
        try:
            with daemon.client() as c:
                for m in c.stream(self.prompt, max_tokens=self.max_tokens, cache=False):
                    if isinstance(m, Chunk):
                        self.tokens.extend(m.tokens)
                        self._started.set()
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            self._started.set()

    def finish(self, model_dir: Path) -> None:
        self._thread.join(120)
        assert self.error is None, self.error
        assert self.tokens == reference(model_dir, self.prompt, self.max_tokens)[1]


def test_http_level_errors_are_json_and_a_witness_stream_is_untouched(
    small_daemon: HttpDaemon, tiny_model: Path
) -> None:
    base = small_daemon.base_url
    witness = Witness(small_daemon, "the witness says", 200)
    with httpx.Client(base_url=base, timeout=60) as http:
        r = http.get("/v1/no/such/thing")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
        assert "/v1/no/such/thing" in r.json()["error"]["message"]
        r = http.get("/api/nothing")
        assert r.status_code == 404 and isinstance(r.json()["error"], str)

        r = http.delete("/v1/models")
        assert r.status_code == 405
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert "GET" in r.headers["Allow"]

        big = b'{"prompt": "' + b"x" * 70_000 + b'"}'
        for path in ("/v1/completions", "/v1/chat/completions", "/api/generate"):
            r = http.post(path, content=big, headers={"Content-Type": "application/json"})
            assert r.status_code == 413, (path, r.text)
            error = r.json()["error"]
            message = error if path.startswith("/api/") else error["message"]
            assert "65536" in message

        # Sent in chunks, with no Content-Length: aiohttp's own limit, worded the same.
        def chunks() -> Iterator[bytes]:
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 10_000
            yield b'"}'

        r = http.post("/v1/completions", content=chunks())
        if r.status_code != 404:  # served: the body is read, and is over the limit
            assert r.status_code == 413 and "65536" in r.json()["error"]["message"]
        r = http.get("/v1/models")  # and the daemon still serves
        assert r.status_code == 200
    witness.finish(tiny_model)


def connect(daemon: HttpDaemon) -> Client:
    """A native client, once the daemon has seen the last test's connections close."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return daemon.client()
        except OverloadedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_overloaded_is_503_with_retry_after(small_daemon: HttpDaemon) -> None:
    # The HTTP request in flight counts against max_connections (3), as a native one.
    clients = [connect(small_daemon) for _ in range(3)]
    try:
        r = httpx.get(f"{small_daemon.base_url}/v1/models", timeout=60)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
    finally:
        for c in clients:
            c.close()
    with connect(small_daemon) as c:
        wait_idle(c)
    assert httpx.get(f"{small_daemon.base_url}/v1/models", timeout=60).status_code == 200


def test_a_client_that_drops_mid_stream_is_cancelled(http_daemon: HttpDaemon) -> None:
    need_completions(http_daemon.base_url)
    with http_daemon.client() as native:
        wait_idle(native)
        before = native.stats().requests_cancelled
    body = {"model": "tiny", "prompt": "drop me", "max_tokens": 4000, "stream": True}
    url = f"{http_daemon.base_url}/v1/completions"
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        for n, _ in enumerate(read_sse(r), 1):
            if n == 3:
                break  # leaving the block closes the connection mid-stream
    with http_daemon.client() as native:
        wait_idle(native)
        stats = native.stats()
        assert stats.requests_cancelled == before + 1
        assert stats.connections == 1  # this client: the dropped request holds no place
    lines = [json.loads(x) for x in http_daemon.log().splitlines() if '"request"' in x]
    dropped = [x for x in lines if x.get("event") == "request" and x.get("api") == "openai"]
    assert dropped[-1]["finish_reason"] == "cancelled", dropped[-1]
    assert dropped[-1]["completion_tokens"] < 4000


def test_16_concurrent_streams_equal_their_solo_runs_and_a_drop_touches_none(
    http_daemon: HttpDaemon, tiny_model: Path
) -> None:
    need_completions(http_daemon.base_url)
    n = 24
    sdk = openai.AsyncOpenAI(base_url=f"{http_daemon.base_url}/v1", api_key="unused")

    async def one(prompt: str) -> str:
        stream = await sdk.completions.create(
            model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def dropped() -> None:
        body = {"model": "tiny", "prompt": "drop me too", "max_tokens": 4000, "stream": True}
        async with httpx.AsyncClient(timeout=60) as http:
            url = f"{http_daemon.base_url}/v1/completions"
            async with http.stream("POST", url, json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen == 3:
                        return  # closes the connection mid-stream

    async def run() -> list[str]:
        results = await asyncio.gather(*(one(p) for p in PROMPTS), dropped())
        await sdk.close()
        return list(results[:16])

    with http_daemon.client() as native:
        wait_idle(native)
        before = native.stats().requests_cancelled
    texts = asyncio.run(run())
    for prompt, text in zip(PROMPTS, texts, strict=True):
        assert text == reference(tiny_model, prompt, n)[0], prompt
    with http_daemon.client() as native:
        wait_idle(native)
        assert native.stats().requests_cancelled == before + 1
