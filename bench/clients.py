"""What the benchmarks in bench/ share on the client's side: deterministic prompts that no
prefix cache can reuse, one streamed completion timed on the client's side (from mlxd's
native socket or from mlx-lm's HTTP server), closed loops of simulated clients on either
or on mlx-lm in this process (the limit a server built on it can approach), and the
statistics over them. Nothing here starts a server (bench/servers.py does) or is a
benchmark of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import re
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

MODEL = "small"
PROMPT_TOKENS = (30, 60)
# Words for prompt bodies; a prompt's first word comes from the tokenizer's vocabulary.
_NOUNS = ["order", "item", "price", "weight", "count", "total", "batch", "record", "user"]
_VERBS = ["load", "parse", "check", "merge", "scale", "update", "render", "store", "send"]

T = TypeVar("T")


# ---------------------------------------------------------------------- prompts


class Prompts:
    """Deterministic prompts, no two sharing a first token after BOS.

    Each starts with its own vocabulary word, and a candidate whose first content token was
    used before is skipped, so a prefix cache can reuse nothing from an earlier prompt but
    BOS. The same prompts go to every contestant, in the same order, so all see the same
    prompt lengths and should produce the same greedy text (compared, as a sanity check).
    ``lengths``: the token counts of the prompts ``short`` and ``code`` made, in order.
    """

    def __init__(self, tokenizer: Any, seed: int = 4) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        vocab = tokenizer._tokenizer.get_vocab() if hasattr(tokenizer, "_tokenizer") else {}
        # Sorted by id: the same order on every run with the same tokenizer.
        self._words = iter(
            w
            for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])
            if w.isascii() and w.isalpha() and w.islower() and 4 <= len(w) <= 9
        )
        self._firsts: set[int] = set()
        self.lengths: list[int] = []

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def _first_content(self, ids: list[int]) -> int:
        bos = self.tokenizer.bos_token_id
        return ids[1] if bos is not None and ids and ids[0] == bos else ids[0]

    def _next(self, body: Callable[[str], str]) -> str:
        for word in self._words:
            text = body(word)
            first = self._first_content(self.ids(text))
            if first not in self._firsts:
                self._firsts.add(first)
                return text
        raise RuntimeError("ran out of distinct first words")

    def short(self) -> str:
        """A 30-60-token prompt: a few lines of Python-like code, left open."""

        def body(word: str) -> str:
            r = self.rng
            noun, verb, other = r.choice(_NOUNS), r.choice(_VERBS), r.choice(_NOUNS)
            lines = [
                f"{word}_{noun} = {verb}_{noun}(path, limit={r.randint(2, 99)})\n",
                f"def {verb}_{word}({noun}, factor={r.randint(1, 9)}):\n",
                f"    # {verb.capitalize()} one {noun}, then return its {other}.\n",
                f"    if {noun} is None:\n        return {r.randint(0, 9)}\n",
                f"    value = {noun}.{other} * factor\n    return ",
            ]
            text = ""
            for line in lines:
                if len(self.ids(text + line)) > PROMPT_TOKENS[1]:
                    break
                text += line
            return text

        text = self._next(body)
        n = len(self.ids(text))
        assert PROMPT_TOKENS[0] <= n <= PROMPT_TOKENS[1], f"a {n}-token prompt"
        self.lengths.append(n)
        return text

    def code(self, tokens: int) -> str:
        """A prompt of ``tokens`` tokens or a few fewer: lines of Python-like code, the last
        one cut short."""

        def lines(word: str) -> Iterator[str]:
            r = self.rng
            yield f"{word}_{r.choice(_NOUNS)} = load_{word}(path, limit={r.randint(2, 99)})\n"
            for i in itertools.count():
                noun, verb, other = r.choice(_NOUNS), r.choice(_VERBS), r.choice(_NOUNS)
                yield f"def {verb}_{noun}_{i}({noun}, factor={r.randint(1, 9)}):\n"
                yield f"    # {verb.capitalize()} one {noun}, then return its {other}.\n"
                yield f"    if {noun} is None:\n        return {r.randint(0, 9)}\n"
                yield f"    return {noun}.{other} * factor + {r.randint(0, 99)}\n"

        def body(word: str) -> str:
            text = ""
            for line in lines(word):
                if len(self.ids(text + line)) <= tokens:
                    text += line
                    continue
                # The last line in part (a word or a character at a time), left open.
                for piece in re.findall(r"[a-zA-Z]+|.", line, re.S):
                    if len(self.ids(text + piece)) > tokens:
                        return text
                    text += piece
            raise AssertionError("unreachable")

        text = self._next(body)
        n = len(self.ids(text))
        assert tokens - 4 <= n <= tokens, f"a {n}-token prompt"
        self.lengths.append(n)
        return text

    def file(self, tokens: int) -> str:
        """About ``tokens`` tokens of a Python-like file, ending in a newline: the context an
        editor sends before the cursor."""

        def body(word: str) -> str:
            parts = [f"{word}_config = {{'name': '{word}', 'version': 3}}\n\n"]
            i = 0
            while len(self.ids("".join(parts))) < tokens:
                noun, verb = _NOUNS[i % len(_NOUNS)], _VERBS[(i * 4) % len(_VERBS)]
                parts.append(
                    f"def {verb}_{noun}_{i}({noun}, factor={i % 9 + 1}):\n"
                    f"    if {noun} is None:\n        return {i % 5}\n"
                    f"    return {noun}.{_NOUNS[(i + 3) % len(_NOUNS)]} * factor + {i}\n\n"
                )
                i += 1
            # One final newline, not a blank line: the typed text then starts a fresh token.
            return "".join(parts).rstrip("\n") + "\n"

        return self._next(body)


# ---------------------------------------------------------------------- one request


@dataclass
class Reply:
    """One streamed completion, timed on the client's side (perf_counter seconds)."""

    sent_at: float
    first_at: float | None = None
    last_at: float | None = None
    done_at: float | None = None
    tokens: int = 0
    events: int = 0
    """Streamed pieces that carried text."""
    text: str = ""
    finish_reason: str | None = None
    cache_kind: str | None = None
    cached_tokens: int | None = None

    @property
    def ttft_s(self) -> float:
        assert self.first_at is not None, "no token arrived"
        return self.first_at - self.sent_at

    def decode_tps(self) -> float:
        assert self.first_at is not None and self.last_at is not None
        return (self.tokens - 1) / (self.last_at - self.first_at)

    def token(self, text: str) -> None:
        """A streamed piece that carries text arrived (the first one ends the TTFT)."""
        now = time.perf_counter()
        self.first_at = self.first_at or now
        self.last_at = now
        self.events += 1
        self.text += text


class HttpStream:
    """One streamed completion from mlx-lm's server over a raw asyncio TCP stream.

    mlx-lm answers in HTTP/1.0 (no chunked encoding: the body ends when the server closes),
    with one server-sent event per token, or per few tokens when a token's text is empty."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> HttpStream:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def send(self, prompt: str, max_tokens: int) -> Reply:
        assert self.writer is not None
        body = json.dumps(
            {
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        reply = Reply(sent_at=time.perf_counter())
        self.writer.write(head + body)
        await self.writer.drain()
        return reply

    async def read_until_first(self, reply: Reply) -> None:
        """Read the status, the headers and events up to the first one carrying text."""
        assert self.reader is not None
        status = await self.reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"mlx_lm server: {status!r} {await self.reader.read(500)!r}")
        while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        while reply.first_at is None:
            if not await self._event(reply):
                raise RuntimeError("mlx_lm server: the stream ended before any token")

    async def read_to_end(self, reply: Reply) -> None:
        while await self._event(reply):
            pass
        reply.done_at = time.perf_counter()
        self.close()

    async def _event(self, reply: Reply) -> bool:
        """Read one event into ``reply``; False at the end of the stream."""
        assert self.reader is not None
        while True:
            line = await self.reader.readline()
            if not line:
                return False
            # Skips blank separators and ": keepalive" comments sent during prefill.
            if line.startswith(b"data:"):
                break
        data = line[5:].strip()
        if data == b"[DONE]":
            return False
        event = json.loads(data)
        if event.get("usage"):
            reply.tokens = event["usage"]["completion_tokens"]
            details = event["usage"].get("prompt_tokens_details") or {}
            reply.cached_tokens = details.get("cached_tokens")
        for choice in event.get("choices") or []:
            if choice.get("text"):
                reply.token(choice["text"])
            if choice.get("finish_reason"):
                # The final event carries the last token (if its text was not empty).
                reply.last_at = time.perf_counter()
                reply.finish_reason = choice["finish_reason"]
        return True

    def close(self) -> None:
        # For a stream still running this is the cancel: mlx-lm notices the closed
        # connection when a write fails, and stops that generation.
        if self.writer is not None:
            self.writer.close()


async def http_request(conn: HttpStream, prompt: str, max_tokens: int) -> Reply:
    """Send on an open connection, stream to the end, close."""
    reply = await conn.send(prompt, max_tokens)
    await conn.read_until_first(reply)
    await conn.read_to_end(reply)
    return reply


async def mlxd_request(client: Any, prompt: str | None, max_tokens: int, **fields: Any) -> Reply:
    """Stream one completion to its end; the first __anext__ sends the request. ``fields``:
    more request fields (``cache=False``; ``messages=`` with no prompt)."""
    stream = client.stream(prompt, model=MODEL, max_tokens=max_tokens, temperature=0.0, **fields)
    reply = Reply(sent_at=time.perf_counter())
    parts = []
    async for chunk in stream:
        if chunk.tokens:
            now = time.perf_counter()
            reply.first_at = reply.first_at or now
            reply.last_at = now
        parts.append(chunk.text)
    reply.done_at = time.perf_counter()
    reply.text = "".join(parts)
    note_done(reply, stream.done)
    return reply


def note_done(reply: Reply, done: Any) -> None:
    """What mlxd's ``done`` says about a request: its tokens, its end, its cache use."""
    assert done is not None
    reply.tokens = done.usage.completion_tokens
    reply.finish_reason = done.finish_reason
    reply.cached_tokens = done.usage.cached_tokens
    reply.cache_kind = done.cache.kind if done.cache is not None else None


# ---------------------------------------------------------------------- closed loops


class MlxdPerRequest:
    """mlxd over its Unix socket, a new ``AsyncClient`` (connection and handshake) for each
    request, which is timed from before the connect; ``cache=False``."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[None]:
        yield None  # nothing kept between requests

    async def request(self, _: None, prompt: str, tokens: int) -> Reply:
        from mlxd.client import AsyncClient

        start = time.perf_counter()
        async with AsyncClient(self.sock, name="bench-client") as client:
            reply = await mlxd_request(client, prompt, tokens, cache=False)
        reply.sent_at = start
        return reply


class HttpPerRequest:
    """mlx-lm's server, streamed ``POST /v1/completions``, a new TCP connection for each
    request (it closes each after its reply anyway), timed from before the connect."""

    def __init__(self, port: int) -> None:
        self.port = port

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[None]:
        yield None

    async def request(self, _: None, prompt: str, tokens: int) -> Reply:
        start = time.perf_counter()
        reply = await http_request(await HttpStream(self.port).connect(), prompt, tokens)
        reply.sent_at = start
        return reply


async def single(backend: Any, prompt: str, tokens: int) -> Reply:
    """One request on a backend (``client()``, ``request(client, prompt, tokens)``)."""
    async with backend.client() as client:
        return await backend.request(client, prompt, tokens)


@dataclass
class Loop:
    """N clients, each sending its prompts back to back: every reply (client by client, in
    order), and the wall time from the first send to the last done."""

    replies: list[Reply]
    wall_s: float
    mean_batch: float | None = None
    """Where known: tokens generated / decode steps during the loop."""


async def closed_loop(backend: Any, per_client: list[list[str]], tokens: int) -> Loop:
    async with contextlib.AsyncExitStack() as stack:
        # Everyone's client (connection, session) is set up before the clock starts.
        clients = [await stack.enter_async_context(backend.client()) for _ in per_client]

        async def one(client: Any, prompts: list[str]) -> list[Reply]:
            return [await backend.request(client, p, tokens) for p in prompts]

        start = time.perf_counter()
        results = await asyncio.gather(
            *(one(c, ps) for c, ps in zip(clients, per_client, strict=True))
        )
        wall = time.perf_counter() - start
    return Loop([r for rs in results for r in rs], wall)


def pooled(loops: list[Loop], each: str = "repeats") -> dict[str, Any]:
    """Loops together: all tokens over all wall time; TTFTs of every request. ``each``
    names the loops in the key of their own aggregates (``aggregate_tps_<each>``)."""
    replies = [r for loop in loops for r in loop.replies]
    ttfts = [r.ttft_s for r in replies]
    tokens, wall = sum(r.tokens for r in replies), sum(loop.wall_s for loop in loops)
    out: dict[str, Any] = {
        "requests": len(replies),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tps": tokens / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "ttft_s": ttfts,
        f"aggregate_tps_{each}": [sum(r.tokens for r in lp.replies) / lp.wall_s for lp in loops],
    }
    batches = [loop.mean_batch for loop in loops if loop.mean_batch is not None]
    if batches:
        out["mean_batch"] = statistics.mean(batches)
    return out


def rotate(names: Sequence[str], i: int) -> list[str]:
    """The order for trial/round ``i``: who goes first moves, so that no one always runs
    first (on a cooler, or hotter, CPU). With two names: they alternate."""
    return [names[(i + k) % len(names)] for k in range(len(names))]


# ---------------------------------------------------------------------- in process


def in_process(model: Any, tokenizer: Any, prompt: str, tokens: int) -> Reply:
    """One stream on mlx-lm's ``stream_generate`` in this process (``mlx_lm.generate``'s)."""
    from mlx_lm import stream_generate

    reply = Reply(sent_at=time.perf_counter())
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
        now = time.perf_counter()
        reply.first_at = reply.first_at or now
        reply.last_at = now
        reply.tokens += 1
    return reply


def in_process_loop(model: Any, tokenizer: Any, per_client: list[list[str]], tokens: int) -> Loop:
    """The closed loop on mlx-lm's ``BatchGenerator`` in this process, with no server, no
    socket and no detokenizing while the clock runs: the most a server built on it can
    reach here. Each client's next prompt goes in the moment its previous one finished."""
    from mlx_lm.generate import BatchGenerator

    n = len(per_client)
    eos = set(tokenizer.eos_token_ids)
    generator = BatchGenerator(
        model,
        stop_tokens=[[t] for t in eos],
        completion_batch_size=n,
        prefill_batch_size=min(n, 8),
    )
    queues = [[list(tokenizer.encode(p)) for p in reversed(ps)] for ps in per_client]
    total = sum(len(q) for q in queues)  # before the first inserts take any out
    replies: list[list[Reply]] = [[] for _ in per_client]
    running: dict[int, tuple[int, list[int]]] = {}  # uid: its client, its tokens
    generated: list[tuple[Reply, list[int]]] = []

    def insert(client: int) -> None:
        reply = Reply(sent_at=time.perf_counter())
        (uid,) = generator.insert([queues[client].pop()], max_tokens=[tokens])
        running[uid] = (client, [])
        replies[client].append(reply)
        generated.append((reply, running[uid][1]))

    steps = finished = 0
    start = time.perf_counter()
    try:
        for client in range(n):
            insert(client)
        while finished < total:
            responses = generator.next_generated()
            steps += bool(responses)
            now = time.perf_counter()
            for response in responses:
                client, ids = running[response.uid]
                reply = replies[client][-1]
                reply.first_at = reply.first_at or now
                reply.last_at = now
                reply.tokens += 1
                ids.append(response.token)
                if response.finish_reason is not None:
                    reply.done_at, reply.finish_reason = now, response.finish_reason
                    finished += 1
                    del running[response.uid]
                    if queues[client]:
                        insert(client)
    finally:
        generator.close()
    wall = time.perf_counter() - start
    for reply, ids in generated:  # the text as mlx-lm would have streamed it (no EOS)
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        for token in ids:
            if token not in eos:
                detokenizer.add_token(token)
        detokenizer.finalize()
        reply.text = detokenizer.text
    loop = Loop([r for rs in replies for r in rs], wall)
    loop.mean_batch = sum(r.tokens for r in loop.replies) / max(1, steps)
    return loop


async def mlxd_loop(sock: Path, per_client: list[list[str]], tokens: int) -> Loop:
    """The closed loop on mlxd, with its mean batch from its own counters."""
    from mlxd.client import AsyncClient

    async with AsyncClient(sock, name="bench-stats") as stats:
        before = await stats.stats()
        loop = await closed_loop(MlxdPerRequest(sock), per_client, tokens)
        after = await stats.stats()
    if steps := after.decode_steps - before.decode_steps:
        loop.mean_batch = (after.tokens_generated - before.tokens_generated) / steps
    return loop


# ---------------------------------------------------------------------- running


def memory(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of a live process, in bytes (Linux)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def run(coro: Awaitable[T], timeout: float = 300) -> T:
    """Run one workload in a fresh event loop, bounded so a stuck server cannot hang us."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# ---------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the sample at or below it. Below
    100 samples, p99 is the maximum."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
