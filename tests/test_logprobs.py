"""Logprobs (native protocol): each generated token's log-probability and the top
alternatives equal a log-softmax that mlx-lm computes in this process for the same prompt
and step, solo and in a batch, and chunks merged for a slow reader keep them in order."""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Daemon
from helpers import RawConn, _load, reference_logprobs, wait_for

from mlxd.client import AsyncClient

PROMPTS = [f"# part {i}\ndef f{i}(x):\n" + "    y = x * 2\n" * (i % 3) for i in range(6)]
# The tiny models compute in bfloat16, as mlx-lm's log-softmax then does: a few of its
# ulps (2**-8 relative) apart, KV-cached decode steps against one whole forward pass.
REL, ABS = 2**-6, 2**-6


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=ABS)


def expected(
    model_dir: Path, prompt: str, generated: list[int], bias: dict[int, float] | None = None
) -> list[list[float]]:
    _, tokenizer = _load(str(model_dir))
    return reference_logprobs(model_dir, tokenizer.encode(prompt), generated, bias)


def check(rows: list[list[float]], tokens: list[int], entries: list[Any], k: int) -> None:
    assert len(entries) == len(tokens) == len(rows)
    for row, token, entry in zip(rows, tokens, entries, strict=True):
        assert entry.token == token
        assert close(entry.logprob, row[token]), (entry.logprob, row[token])
        best = sorted(row, reverse=True)[:k]
        assert len(entry.top_logprobs) == k
        got = [t.logprob for t in entry.top_logprobs]
        assert got == sorted(got, reverse=True)
        for alt, want in zip(entry.top_logprobs, best, strict=True):
            assert close(alt.logprob, want)
            assert close(row[alt.token], alt.logprob)


async def run(client: AsyncClient, prompt: str, **options: Any) -> tuple[list[int], list[Any]]:
    tokens: list[int] = []
    entries: list[Any] = []
    async with client.stream(prompt, model="tiny", cache=False, **options) as stream:
        async for chunk in stream:
            tokens += chunk.tokens
            assert chunk.logprobs is not None and len(chunk.logprobs) == len(chunk.tokens)
            entries += chunk.logprobs
    return tokens, entries


async def test_logprobs_equal_mlx_lm_log_softmax_solo(daemon: Daemon, tiny_model: Path) -> None:
    async with AsyncClient(daemon.socket) as client:
        tokens, entries = await run(client, PROMPTS[0], max_tokens=12, top_logprobs=5)
        check(expected(tiny_model, PROMPTS[0], tokens), tokens, entries, 5)
        # Sampled at a temperature, with a bias: the values are the biased distribution's,
        # before temperature (what the sampler drew from, not a rescaled copy).
        bias = {tokens[0]: -3.0, 10: 4.0}
        options = {"temperature": 1.5, "seed": 7, "logit_bias": bias}
        tokens, entries = await run(client, PROMPTS[1], max_tokens=10, logprobs=True, **options)
        check(expected(tiny_model, PROMPTS[1], tokens, bias), tokens, entries, 0)
        # The text of a token is its bytes: they concatenate to the text.
        model_bytes = b"".join(e.bytes for e in entries)
        _, tokenizer = _load(str(tiny_model))
        assert model_bytes.decode(errors="replace") == tokenizer.decode(tokens)


async def test_logprobs_in_a_batch_of_concurrent_sequences(
    daemon: Daemon, tiny_model: Path
) -> None:
    got: dict[int, tuple[list[int], list[Any]]] = {}
    async with AsyncClient(daemon.socket) as client:
        before = await client.stats()

        async def one(i: int) -> None:
            options: dict[str, Any] = {"top_logprobs": i * 4} if i % 2 else {"logprobs": True}
            got[i] = await run(client, PROMPTS[i], max_tokens=8 + i, **options)

        async with anyio.create_task_group() as tg:
            for i in range(len(PROMPTS)):
                tg.start_soon(one, i)
        after = await client.stats()
        # Asking for none gets none.
        async with client.stream(PROMPTS[0], model="tiny", max_tokens=4) as stream:
            assert all([chunk.logprobs is None async for chunk in stream])
    # They really were decoded together, not one sequence at a time.
    steps = after.decode_steps - before.decode_steps
    assert (after.tokens_generated - before.tokens_generated) / steps > 2.0
    for i, (tokens, entries) in got.items():
        check(expected(tiny_model, PROMPTS[i], tokens), tokens, entries, i * 4 if i % 2 else 0)


def test_merged_chunks_carry_every_tokens_logprobs_in_order(
    daemon: Daemon, tiny_model: Path
) -> None:
    """A client that does not read: its chunks pile up in the server and are merged (and
    its sequence paused, then resumed once it reads). Its end-of-sequence tokens are
    biased away, so it runs until the kernel's and the server's buffers are full."""
    _, tokenizer = _load(str(tiny_model))
    bias = {t: -100.0 for t in tokenizer.eos_token_ids}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(120)
    sock.connect(str(daemon.socket))
    conn = RawConn.__new__(RawConn)
    conn.sock = sock
    try:
        conn.send({"type": "hello", "protocol": 1})
        assert conn.recv()["type"] == "welcome"
        with daemon.client() as client:
            before = client.stats().sequences_preempted
            conn.send({"type": "generate", "id": 1, "prompt": PROMPTS[2], "model": "tiny",
                       "max_tokens": 2000, "cache": False, "top_logprobs": 20,
                       "logit_bias": bias})  # fmt: skip
            wait_for(client, lambda s: s.sequences_preempted > before)
        chunks, done = conn.recv_until_end(1)
    finally:
        conn.close()
    assert done["type"] == "done"
    assert any(len(c["tokens"]) > 1 for c in chunks), "nothing was merged"
    assert all(len(c["logprobs"]) == len(c["tokens"]) for c in chunks)
    tokens = [t for c in chunks for t in c["tokens"]]
    entries = [e for c in chunks for e in c["logprobs"]]
    assert len(tokens) == 2000
    rows = expected(tiny_model, PROMPTS[2], tokens, bias)
    assert [e["token"] for e in entries] == tokens
    for row, e in zip(rows, entries, strict=True):
        assert close(e["logprob"], row[e["token"]])
        assert len(e["top_logprobs"]) == 20
        best = e["top_logprobs"][0]
        assert close(best["logprob"], max(row))


@pytest.mark.parametrize("value", [21, -1])
def test_top_logprobs_out_of_range_is_invalid_request(daemon: Daemon, value: int) -> None:
    conn = RawConn(daemon.socket)
    try:
        conn.send({"type": "generate", "id": 1, "prompt": "x", "top_logprobs": value})
        _, end = conn.recv_until_end(1)
    finally:
        conn.close()
    assert end["type"] == "error" and end["code"] == "invalid_request"
    assert end["field"] == "$.top_logprobs"
