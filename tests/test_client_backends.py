"""The async client on each anyio backend: on asyncio its connection moves to asyncio's own
streams after the handshake, on trio it stays on anyio's socket stream
(clients/python/_sockets.py). Both must stream mlx-lm's greedy output, frames that come
together as well as one at a time, and raise the daemon's errors as they are."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from conftest import Daemon
from helpers import reference

from mlxd.client import AsyncClient, Chunk, UnknownModelError

pytest.importorskip("trio")

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_async_client_streams_and_fails_alike_on_every_backend(
    daemon: Daemon, tiny_model: Path, backend: str
) -> None:
    async def run() -> tuple[dict[str, tuple[str, list[int]]], str]:
        results: dict[str, tuple[str, list[int]]] = {}
        async with AsyncClient(daemon.socket) as client:

            async def one(prompt: str) -> None:
                text, ids = [], []
                async for chunk in client.stream(prompt, model="tiny", max_tokens=40):
                    assert isinstance(chunk, Chunk)
                    text.append(chunk.text)
                    ids.extend(chunk.tokens)
                results[prompt] = ("".join(text), ids)

            # Three streams at once on one connection: their frames arrive interleaved,
            # often several in one read.
            async with anyio.create_task_group() as tg:
                for prompt in PROMPTS:
                    tg.start_soon(one, prompt)
            try:
                await client.load("no-such-model")
            except UnknownModelError as exc:
                code = exc.code
            # The connection is still good after the error.
            assert (await client.generate("x", model="tiny", max_tokens=2)).done.usage
        return results, code

    results, code = anyio.run(run, backend=backend)
    assert code == "unknown_model"
    for prompt in PROMPTS:
        assert results[prompt] == reference(tiny_model, prompt, 40), (backend, prompt)
