"""The prompt cache through a real daemon: every path reuses state and changes no token."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import chat_tokens, reference

from mlxd.client import AsyncClient, Client

LONG = "".join(f"def function_{i}(x):\n    return x * {i} + {i * i}\n\n" for i in range(40))


@pytest.fixture
def cache_daemon(tiny_model: Path, tiny_model_b: Path) -> Iterator[Daemon]:
    base = short_tmpdir()
    d = start_daemon(
        base / "mlxd.sock", "--model", f"tiny={tiny_model}", "--model", f"tiny-b={tiny_model_b}"
    )
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


def run(client: Client, prompt: str | list[int], **options: object) -> tuple[list[int], object]:
    key = "tokens" if isinstance(prompt, list) else "prompt"
    done = client.generate(**{key: prompt}, max_tokens=24, **options)  # type: ignore[arg-type]
    return done.tokens, done.done


def test_cold_exact_extension_and_trim_all_equal_mlx_lm(
    cache_daemon: Daemon, tiny_model: Path
) -> None:
    from helpers import _load

    _, tokenizer = _load(str(tiny_model))
    ids = tokenizer.encode(LONG)
    assert len(ids) > 500
    extended = ids + tokenizer.encode("def extra(y):", add_special_tokens=False)
    prefix = ids[: len(ids) // 2]

    with cache_daemon.client() as client:
        cold, done = run(client, ids)
        assert done.cache.kind == "miss" and done.usage.cached_tokens == 0
        # Stored: the prompt and its 24 generated tokens. The same prompt again is served
        # by trimming that back to the whole prompt (but its last token, which is rerun).
        hit, done = run(client, ids)
        assert done.cache.kind == "longer" and done.usage.cached_tokens == len(ids) - 1
        ext, done = run(client, extended)
        # The extension shares the prompt, then differs from the generated part.
        assert done.cache.kind == "longer" and done.usage.cached_tokens >= len(ids)
        trimmed, done = run(client, prefix)
        assert done.cache.kind == "longer" and done.usage.cached_tokens == len(prefix) - 1
        stats = client.stats().cache
        assert stats.hits["longer"] == 3 and stats.hits["miss"] == 1
        assert stats.tokens_reused >= 2 * len(ids) + len(prefix) - 3

    assert cold == hit == reference(tiny_model, ids, 24)[1]
    assert ext == reference(tiny_model, extended, 24)[1]
    assert trimmed == reference(tiny_model, prefix, 24)[1]


def test_a_prompt_extending_prompt_and_reply_is_a_shorter_hit(
    cache_daemon: Daemon, tiny_model: Path
) -> None:
    from helpers import _load

    ids = _load(str(tiny_model))[1].encode(LONG)
    with cache_daemon.client() as client:
        first = client.generate(tokens=ids, max_tokens=8)
        # The next turn as token ids: everything the model saw, then more.
        continued = ids + first.tokens + ids[:5]
        done = client.generate(tokens=continued, max_tokens=16)
    assert done.done.cache.kind == "shorter"
    assert done.done.usage.cached_tokens == len(ids) + len(first.tokens)
    assert done.tokens == reference(tiny_model, continued, 16)[1]


async def test_sixteen_concurrent_requests_on_one_system_prompt(
    cache_daemon: Daemon, tiny_model: Path
) -> None:
    system = "You are a careful assistant. " * 30
    prompts = [f"{system}Question {i}: what is {i} squared?" for i in range(16)]
    got: dict[int, list[int]] = {}

    async with AsyncClient(cache_daemon.socket) as client:
        # Warm the system prompt, then all at once.
        await client.generate(system, max_tokens=1)

        async def one(i: int) -> None:
            done = await client.generate(prompts[i], max_tokens=12 + i)
            got[i] = done.tokens
            assert done.done.usage.cached_tokens > 0

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(one, i)
    for i in range(16):
        assert got[i] == reference(tiny_model, prompts[i], 12 + i)[1], i


async def test_a_prompt_state_taken_alone_stays_open_once_others_join(
    cache_daemon: Daemon, tiny_model: Path
) -> None:
    """The first sequence on a cached system prompt takes its entry and runs alone; when a
    second comes, the first moves into the batch with it, and its state stays open to
    forks: the second still reuses the system prompt."""
    system = "You are a careful assistant. " * 30
    first, second = (f"{system}Question {i}: what is {i} squared?" for i in (1, 2))
    async with AsyncClient(cache_daemon.socket) as client:
        await client.generate(system, max_tokens=1)
        stream = client.stream(first, max_tokens=60)
        got: list[int] = []
        async with stream:
            async for chunk in stream:
                got += chunk.tokens
                if len(got) == 2:
                    joined = await client.generate(second, max_tokens=8)
        assert stream.done is not None and stream.done.usage.cached_tokens > 0
    assert joined.done.usage.cached_tokens > len(system) // 10, joined.done
    assert joined.tokens == reference(tiny_model, second, 8)[1]
    assert got == reference(tiny_model, first, 60)[1]


def test_each_chat_turn_reuses_the_previous_one(cache_daemon: Daemon, tiny_model: Path) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": "Be brief."}]
    previous_prompt = 0
    with cache_daemon.client() as client:
        for turn in range(4):
            messages.append({"role": "user", "content": f"Tell me fact number {turn}."})
            reply = client.chat(messages, max_tokens=10)
            prompt = chat_tokens(tiny_model, messages)
            assert reply.tokens == reference(tiny_model, prompt, 10)[1]
            if turn:
                # The whole previous prompt, at least, came from the cache.
                assert reply.done.usage.cached_tokens >= previous_prompt, reply.done
            previous_prompt = len(prompt)
            messages.append({"role": "assistant", "content": reply.text})


def test_bypass_and_clear(cache_daemon: Daemon) -> None:
    with cache_daemon.client() as client:
        client.generate(LONG, max_tokens=2)
        bypass = client.generate(LONG, max_tokens=2, cache=False)
        assert bypass.done.cache.kind == "bypass" and bypass.done.usage.cached_tokens == 0
        assert client.stats().cache.bytes_by_model.get("tiny", 0) > 0
        client.clear_cache("tiny")
        assert "tiny" not in client.stats().cache.bytes_by_model
        assert client.generate(LONG, max_tokens=2).done.cache.kind == "miss"


def test_unloading_a_model_drops_its_entries(cache_daemon: Daemon) -> None:
    with cache_daemon.client() as client:
        client.generate(LONG, model="tiny-b", max_tokens=2)
        assert client.stats().cache.bytes_by_model.get("tiny-b", 0) > 0
        client.unload("tiny-b")
        assert "tiny-b" not in client.stats().cache.bytes_by_model


def test_the_cache_survives_a_restart_and_corrupt_files_are_skipped(
    tiny_model: Path,
) -> None:
    base = short_tmpdir()
    sock = base / "mlxd.sock"
    args = ("--model", f"tiny={tiny_model}", "--state-dir", str(base / "state"))
    d = start_daemon(sock, *args)
    with d.client() as client:
        cold = client.generate(LONG, max_tokens=20)
    assert d.stop() == 0
    saved = list((base / "state" / "prompt-cache").glob("*.safetensors"))
    assert saved

    d = start_daemon(sock, *args)
    with d.client() as client:
        warm = client.generate(LONG, max_tokens=20)
    assert d.stop() == 0
    assert warm.done.cache.kind == "longer"
    assert warm.done.usage.cached_tokens == warm.done.usage.prompt_tokens - 1
    assert warm.tokens == cold.tokens == reference(tiny_model, LONG, 20)[1]
    assert any(
        json.loads(x).get("event") == "cache_restored"
        for x in d.log().splitlines()
        if x.startswith("{")
    )

    for f in (base / "state" / "prompt-cache").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    d = start_daemon(sock, *args)
    with d.client() as client:
        again = client.generate(LONG, max_tokens=20)
    assert d.stop() == 0
    assert again.done.cache.kind == "miss" and again.tokens == cold.tokens
    assert "cache_file_skipped" in d.log()
    shutil.rmtree(base)


def test_switching_between_files_that_share_their_first_tokens_keeps_each_files_state(
    cache_daemon: Daemon, tiny_model: Path
) -> None:
    # Three "files" that share only their first two tokens, then ~200 tokens of their own.
    lead = [11, 12]
    files = [lead + [20 + (i * 37 + n * 13) % 900 for n in range(200 + i)] for i in range(3)]
    cold = {i: reference(tiny_model, f, 24)[1] for i, f in enumerate(files)}
    with cache_daemon.client() as client:
        for round_ in range(4):
            for i, prompt in enumerate(files):
                out, done = run(client, prompt)
                assert out == cold[i], (round_, i)
                if round_ == 0:
                    continue
                # Its own state, stored by its last round: all of it reused.
                assert done.usage.cached_tokens == len(prompt) - 1, (round_, i, done)
        assert client.stats().cache.entries == 3
