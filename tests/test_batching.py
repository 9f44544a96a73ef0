"""Continuous batching and scheduling: batched output equals solo output, token for token."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import RawConn, reference

from mlxd.client import AsyncClient, OverloadedError

PROMPTS = [f"# task {i}\n" + "def step(x):\n    return x + 1\n" * (i % 5) for i in range(16)]


@pytest.fixture
def small_batch_daemon(tiny_model: Path, tiny_model_b: Path) -> Iterator[Daemon]:
    base = short_tmpdir()
    d = start_daemon(
        base / "mlxd.sock",
        "--model", f"tiny={tiny_model}", "--model", f"tiny-b={tiny_model_b}",
        "--max-batch-size", "2", "--max-queued", "2",
    )  # fmt: skip
    yield d
    assert d.stop() == 0, d.log()
    shutil.rmtree(base, ignore_errors=True)


async def test_sixteen_concurrent_mixed_requests_on_two_models_equal_solo(
    daemon: Daemon, tiny_model: Path, tiny_model_b: Path
) -> None:
    paths = {"tiny": tiny_model, "tiny-b": tiny_model_b}
    jobs = [("tiny" if i % 2 else "tiny-b", PROMPTS[i], 10 + 7 * i) for i in range(16)]
    got: dict[int, list[int]] = {}
    async with AsyncClient(daemon.socket) as client:
        before = await client.stats()

        async def one(i: int) -> None:
            model, prompt, n = jobs[i]
            got[i] = (await client.generate(prompt, model=model, max_tokens=n, cache=False)).tokens

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(one, i)
        after = await client.stats()
    for i, (model, prompt, n) in enumerate(jobs):
        assert got[i] == reference(paths[model], prompt, n)[1], (i, model)
    # The tokens really were decoded in batches, not one sequence at a time.
    tokens = after.tokens_generated - before.tokens_generated
    steps = after.decode_steps - before.decode_steps
    assert tokens / steps > 2.0, (tokens, steps)


async def test_cancelling_one_request_leaves_the_batch_unchanged(
    daemon: Daemon, tiny_model: Path
) -> None:
    got: dict[int, list[int]] = {}
    async with AsyncClient(daemon.socket) as client:

        async def one(i: int) -> None:
            got[i] = (await client.generate(PROMPTS[i], max_tokens=80, cache=False)).tokens

        async def cancelled() -> None:
            stream = client.stream(PROMPTS[5], max_tokens=5000, cache=False)
            async with stream:
                n = 0
                async for _ in stream:
                    n += 1
                    if n == 10:
                        break
            assert stream.done is None or stream.done.finish_reason == "cancelled"

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled)
            for i in range(4):
                tg.start_soon(one, i)
    for i in range(4):
        assert got[i] == reference(tiny_model, PROMPTS[i], 80)[1]


def test_overload_refuses_the_excess_and_completes_the_rest(
    small_batch_daemon: Daemon, tiny_model: Path
) -> None:
    conn = RawConn(small_batch_daemon.socket)
    for i in range(8):
        conn.send({"type": "generate", "id": i, "prompt": PROMPTS[i], "max_tokens": 40})
    ends: dict[int, dict] = {}
    tokens: dict[int, list[int]] = {i: [] for i in range(8)}
    positions: dict[int, list[int]] = {i: [] for i in range(8)}
    while len(ends) < 8:
        m = conn.recv()
        if m["type"] == "chunk":
            tokens[m["id"]] += m["tokens"]
        elif m["type"] == "queued":
            positions[m["id"]].append(m["position"])
        else:
            ends[m["id"]] = m
    conn.close()
    refused = [i for i, m in ends.items() if m["type"] == "error"]
    accepted = [i for i, m in ends.items() if m["type"] == "done"]
    assert refused and all(ends[i]["code"] == "overloaded" for i in refused)
    assert len(accepted) == 4  # two in the batch, two in the queue
    for i in accepted:
        assert tokens[i] == reference(tiny_model, PROMPTS[i], 40)[1]
    waited = [i for i in accepted if positions[i]]
    assert len(waited) == 2
    assert sorted(positions[i][0] for i in waited) == [0, 1]
    assert any(positions[i][-1] == 0 for i in waited)


def test_overloaded_error_is_typed_in_the_client(small_batch_daemon: Daemon) -> None:
    conn = RawConn(small_batch_daemon.socket)
    for i in range(4):
        conn.send({"type": "generate", "id": i, "prompt": "x", "max_tokens": 3000})
    with small_batch_daemon.client() as client, pytest.raises(OverloadedError) as info:
        client.generate("y", max_tokens=2)
    assert info.value.code == "overloaded"
    conn.close()


async def test_a_short_request_to_another_model_is_not_starved(daemon: Daemon) -> None:
    order: list[str] = []
    async with AsyncClient(daemon.socket) as client:

        async def run(name: str, model: str, n: int) -> None:
            await client.generate("once upon a time", model=model, max_tokens=n, cache=False)
            order.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "long", "tiny", 3000)
            await anyio.sleep(0.2)
            tg.start_soon(run, "short", "tiny-b", 20)
    assert order == ["short", "long"]


def test_a_request_can_supersede_the_previous_keystroke(daemon: Daemon, tiny_model: Path) -> None:
    conn = RawConn(daemon.socket)
    conn.send({"type": "generate", "id": 1, "prompt": "def comp", "max_tokens": 5000})
    assert conn.recv()["type"] == "chunk"
    conn.send(
        {"type": "generate", "id": 2, "prompt": "def compute", "max_tokens": 12, "supersedes": 1}
    )
    ends: dict[int, dict] = {}
    tokens: list[int] = []
    while len(ends) < 2:
        m = conn.recv()
        if m["type"] == "chunk" and m["id"] == 2:
            tokens += m["tokens"]
        elif m["type"] in ("done", "error"):
            ends[m["id"]] = m
    conn.close()
    assert ends[1]["finish_reason"] == "cancelled"
    assert ends[1]["usage"]["completion_tokens"] < 5000
    assert ends[2]["finish_reason"] == "length"
    assert tokens == reference(tiny_model, "def compute", 12)[1]


async def test_a_sequence_running_alone_joins_the_batch_when_others_arrive(
    daemon: Daemon, tiny_model: Path
) -> None:
    """A model's lone sequence runs on its own generator; once others of its model come, it
    moves into their batch, so each round runs one forward pass for all of them (not one
    for it and one for the batch), and every sequence's tokens stay what they would be
    alone: greedy ones equal mlx-lm's, a seeded sampled one equal its solo run."""
    seeded = {"temperature": 0.9, "seed": 7, "cache": False}
    async with AsyncClient(daemon.socket) as client:
        alone = (await client.generate(PROMPTS[2], max_tokens=200, **seeded)).tokens
        before = await client.stats()
        got: dict[int, list[int]] = {}

        async def late(i: int) -> None:
            got[i] = (await client.generate(PROMPTS[i], max_tokens=40, cache=False)).tokens

        first: list[int] = []
        stream = client.stream(PROMPTS[2], max_tokens=200, **seeded)
        async with anyio.create_task_group() as tg, stream:
            async for chunk in stream:
                first += chunk.tokens
                if len(first) == 3:
                    tg.start_soon(late, 0)
                    tg.start_soon(late, 1)
        after = await client.stats()
    assert first == alone
    for i in (0, 1):
        assert got[i] == reference(tiny_model, PROMPTS[i], 40)[1], i
    steps = after.decode_steps - before.decode_steps
    # Merged: about one step per token of the long sequence. Apart: 40 more.
    assert steps <= len(first) + 10, (steps, len(first))
