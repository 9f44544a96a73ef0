"""Generation through a real daemon equals mlx-lm's own, alone, concurrent and across models."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import chat_tokens, reference

from mlxd.client import AsyncClient, Chunk, InvalidRequestError

PROMPTS = [
    "def fibonacci(n):",
    "import os\n",
    "class Stack:\n    def push(self, item):",
    "# Sort a list of numbers",
    "for i in range(10):",
    "Hello, world! ",
    "The quick brown fox",
    "x = [1, 2, 3]\nprint(",
]


def test_greedy_equals_mlx_lm_in_process(daemon: Daemon, tiny_model: Path) -> None:
    with daemon.client() as client:
        for prompt in PROMPTS[:3]:
            done = client.generate(prompt, max_tokens=48)
            text, ids = reference(tiny_model, prompt, 48)
            assert done.tokens == ids
            assert done.text == text
            usage = done.done.usage
            assert usage is not None and usage.completion_tokens == len(ids)
            assert done.done.finish_reason in ("length", "stop")


def test_token_and_chat_prompts_equal_mlx_lm(daemon: Daemon, tiny_model: Path) -> None:
    messages = [{"role": "user", "content": "Write a haiku about sockets."}]
    prompt_ids = chat_tokens(tiny_model, messages)
    text, ids = reference(tiny_model, prompt_ids, 32)
    with daemon.client() as client:
        chat = client.chat(messages, max_tokens=32)
        by_ids = client.generate(tokens=prompt_ids, max_tokens=32)
    assert chat.tokens == ids and chat.text == text
    assert by_ids.tokens == ids
    assert chat.done.usage is not None and chat.done.usage.prompt_tokens == len(prompt_ids)


async def test_eight_concurrent_clients_each_equal_alone(daemon: Daemon, tiny_model: Path) -> None:
    results: dict[str, tuple[str, list[int]]] = {}

    async def one(prompt: str, max_tokens: int) -> None:
        async with AsyncClient(daemon.socket) as client:
            done = await client.generate(prompt, max_tokens=max_tokens)
            results[prompt] = (done.text, done.tokens)

    async with anyio.create_task_group() as tg:
        for i, prompt in enumerate(PROMPTS):
            tg.start_soon(one, prompt, 24 + 8 * i)
    for i, prompt in enumerate(PROMPTS):
        assert results[prompt] == reference(tiny_model, prompt, 24 + 8 * i), prompt


async def test_requests_on_one_connection_are_interleaved(daemon: Daemon) -> None:
    """One long generation must not hold up a short one started after it."""
    order: list[str] = []
    async with AsyncClient(daemon.socket) as client:

        async def run(name: str, max_tokens: int) -> None:
            async for _ in client.stream("long story:", max_tokens=max_tokens):
                pass
            order.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "long", 1500)
            await anyio.sleep(0.05)
            tg.start_soon(run, "short", 5)
    assert order == ["short", "long"]


async def test_two_models_interleaved_each_equal_alone(
    daemon: Daemon, tiny_model: Path, tiny_model_b: Path
) -> None:
    got: dict[tuple[str, str], tuple[str, list[int]]] = {}

    async def one(model: str, prompt: str) -> None:
        async with AsyncClient(daemon.socket) as client:
            done = await client.generate(prompt, model=model, max_tokens=40)
            got[model, prompt] = (done.text, done.tokens)

    async with anyio.create_task_group() as tg:
        for prompt in PROMPTS[:3]:
            tg.start_soon(one, "tiny", prompt)
            tg.start_soon(one, "tiny-b", prompt)
    for prompt in PROMPTS[:3]:
        assert got["tiny", prompt] == reference(tiny_model, prompt, 40)
        assert got["tiny-b", prompt] == reference(tiny_model_b, prompt, 40)
        assert got["tiny", prompt] != got["tiny-b", prompt]


def test_stop_string_spanning_chunks_is_never_streamed(daemon: Daemon, tiny_model: Path) -> None:
    prompt = PROMPTS[0]
    with daemon.client() as client:
        chunks = [m for m in client.stream(prompt, max_tokens=40) if isinstance(m, Chunk)]
        texts = [c.text for c in chunks]
        # A stop string made of the end of one chunk and the start of the next.
        k = next(i for i in range(5, len(texts) - 1) if texts[i] and texts[i + 1])
        stop = texts[k][-2:] + texts[k + 1][:2]
        full = "".join(texts)
        expected = full[: full.index(stop)]
        streamed = list(client.stream(prompt, max_tokens=40, stop=[stop]))
    text = "".join(m.text for m in streamed if isinstance(m, Chunk))
    assert text == expected
    assert stop not in text
    assert streamed[-1].finish_reason == "stop"
    assert streamed[-1].stop_sequence == stop  # the done names the stop string that ended it


def test_seeded_sampling_is_reproducible_even_when_interleaved(daemon: Daemon) -> None:
    options = {"max_tokens": 32, "temperature": 1.0, "top_p": 0.95, "top_k": 50}
    with daemon.client() as client:
        first = client.generate(PROMPTS[1], seed=7, **options).tokens
        other_seed = client.generate(PROMPTS[1], seed=8, **options).tokens

    # The same seeded request again, while another client generates on the same worker.
    noise_done = threading.Event()

    def noise() -> None:
        with daemon.client() as c:
            c.generate(PROMPTS[2], max_tokens=200, temperature=1.0)
        noise_done.set()

    t = threading.Thread(target=noise)
    t.start()
    with daemon.client() as client:
        again = client.generate(PROMPTS[1], seed=7, **options).tokens
    t.join()
    assert first == again
    assert first != other_seed


def test_logit_bias_and_penalties_reach_the_sampler(daemon: Daemon) -> None:
    with daemon.client() as client:
        biased = client.generate(PROMPTS[0], max_tokens=10, logit_bias={42: 100.0})
        assert biased.tokens == [42] * 10
        # A strong repetition penalty changes a forced repetition.
        penalized = client.generate(
            PROMPTS[0], max_tokens=10, logit_bias={42: 5.0}, repetition_penalty=50.0
        )
        assert penalized.tokens != biased.tokens
        with pytest.raises(InvalidRequestError) as info:
            client.generate(PROMPTS[0], max_tokens=4, logit_bias={10**6: 1.0})
        assert info.value.field == "$.logit_bias"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"temperature": -1.0}, "$.temperature"),
        ({"temperature": float("nan")}, "$.temperature"),
        ({"top_p": 1.5}, "$.top_p"),
        ({"top_k": -3}, "$.top_k"),
        ({"min_p": float("inf")}, "$.min_p"),
        ({"max_tokens": 0}, "$.max_tokens"),
        ({"max_tokens": 10**9}, "$.max_tokens"),
        ({"repetition_penalty": 0.0}, "$.repetition_penalty"),
        ({"xtc_threshold": 0.9}, "$.xtc_threshold"),
        ({"stop": [""]}, "$.stop[0]"),
    ],
)
def test_invalid_sampling_values_name_the_field(
    daemon: Daemon, options: dict[str, object], field: str
) -> None:
    with daemon.client() as client:
        with pytest.raises(InvalidRequestError) as info:
            client.generate(PROMPTS[0], **options)
        assert info.value.code == "invalid_request"
        assert info.value.field == field
        assert client.ping() > 0  # the connection is still good


CONTEXT = 64


@pytest.fixture(scope="module")
def short_context_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a context of 64 tokens (where the daemon reads it from)."""
    folder = tmp_path_factory.mktemp("short-context")
    for f in tiny_model.iterdir():
        shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_generation_stops_at_the_models_context(short_context_model: Path) -> None:
    prompts = ["count:", "def fibonacci(n):", "import os\n"]
    base = short_tmpdir()
    d = start_daemon(base / "mlxd.sock", "--model", f"short={short_context_model}")
    try:

        def run(prompt: str) -> Any:
            with d.client() as c:
                return c.generate(prompt, max_tokens=4000, cache=False)

        alone = run(prompts[0])
        with d.client() as c:
            before = c.stats()
        with ThreadPoolExecutor(len(prompts)) as pool:  # together: the batched path
            batched = list(pool.map(run, prompts))
        with d.client() as c:
            after = c.stats()
        steps = after.decode_steps - before.decode_steps
        assert steps < after.tokens_generated - before.tokens_generated  # some were batched
        for prompt, done in [(prompts[0], alone), *zip(prompts, batched, strict=True)]:
            usage = done.done.usage
            assert usage is not None
            room = CONTEXT - usage.prompt_tokens
            assert done.done.finish_reason == "length", (prompt, done.done)
            assert usage.completion_tokens == room == len(done.tokens)
            assert done.tokens == reference(short_context_model, prompt, room)[1]
        assert d.stop() == 0, d.log()
    finally:
        if d.proc.poll() is None:
            d.stop(9)
        shutil.rmtree(base, ignore_errors=True)
