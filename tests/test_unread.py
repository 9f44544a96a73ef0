"""A client that sends and never reads must not hold the batch: its sequences are paused
(they leave the batch, keeping their KV state) while its replies pile up unread, and go on
exactly where they were once it reads. Against a real daemon."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import RawConn, reference, wait_for

GREEDY = 64
MAX_TOKENS = 512
PROMPTS = [f"greedy {i}:" for i in range(8)]


@pytest.fixture
def small_batch(tiny_model: Path) -> Iterator[Daemon]:
    d = start_daemon(
        short_tmpdir() / "mlxd.sock",
        "--model",
        f"tiny={tiny_model}",
        "--default-model",
        "tiny",
        "--max-batch-size",
        "4",
    )
    yield d
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert code == 0, d.log()


def unread_connection(path: Path) -> RawConn:
    """A connection with a receive buffer as small as the kernel allows."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(120)
    sock.connect(str(path))
    conn = RawConn.__new__(RawConn)
    conn.sock = sock
    conn.send({"type": "hello", "protocol": 1})
    assert conn.recv()["type"] == "welcome"
    return conn


def frame(message: dict[str, Any]) -> bytes:
    payload = msgspec.msgpack.encode(message)
    return struct.pack(">I", len(payload)) + payload


def test_a_client_that_never_reads_gives_up_its_batch_places(
    small_batch: Daemon, tiny_model: Path
) -> None:
    greedy = unread_connection(small_batch.socket)
    for i in range(GREEDY):
        prompt = PROMPTS[i % len(PROMPTS)]
        greedy.send({"type": "generate", "id": i + 1, "prompt": prompt, "max_tokens": MAX_TOKENS})
    with small_batch.client() as client:
        wait_for(client, lambda s: s.active_sequences == 4)  # it holds every place
        result: dict[str, Any] = {}

        def other() -> None:
            with small_batch.client() as c:
                result["done"] = c.generate("def other():", max_tokens=4)

        t = threading.Thread(target=other)
        t.start()
        # Bounded: once the greedy connection's replies pile up unread, it is paused.
        t.join(90)
        assert "done" in result, f"the other client still waits: {client.stats()}"
        assert result["done"].tokens == reference(tiny_model, "def other():", 4)[1]
        stats = client.stats()
        # The greedy client still has most of its work ahead: it did not have to finish
        # its batch places' worth of requests before the other was served.
        assert stats.requests_in_flight - 1 >= GREEDY // 4, stats
        assert stats.sequences_preempted >= 1, stats
        # While it reads nothing, nothing more is generated for it.
        paused = wait_for(client, lambda s: s.active_sequences == 0, timeout=30)
        assert paused.requests_in_flight - 1 >= GREEDY // 4
        assert paused.tokens_generated < GREEDY * MAX_TOKENS

    # Now it reads: every reply is complete, and what an uninterrupted run gives.
    outputs: dict[int, list[dict[str, Any]]] = {i + 1: [] for i in range(GREEDY)}
    ends: dict[int, dict[str, Any]] = {}
    while len(ends) < GREEDY:
        m = greedy.recv()
        if m["type"] == "chunk":
            outputs[m["id"]].append(m)
        elif m["type"] in ("done", "error"):
            ends[m["id"]] = m
    greedy.close()
    expected = {p: reference(tiny_model, p, MAX_TOKENS) for p in PROMPTS}
    for rid, chunks in outputs.items():
        end = ends[rid]
        assert end["type"] == "done", end
        text, ids = expected[PROMPTS[(rid - 1) % len(PROMPTS)]]
        got = [t for c in chunks for t in c["tokens"]]
        assert got == ids, rid
        assert "".join(c["text"] for c in chunks) == text, rid
        assert end["usage"]["completion_tokens"] == len(ids)


def test_a_lone_unread_sequence_is_paused_and_resumed_token_exact(
    small_batch: Daemon, tiny_model: Path
) -> None:
    """Alone, a sequence runs on the SoloGenerator: paused and resumed there, too. The
    replies piling up unread are pings' (the loop answers them at once), so the pause comes
    within a few tokens, and comes again as the pings go on while the client reads."""
    n = 3000
    conn = unread_connection(small_batch.socket)
    conn.send({"type": "generate", "id": 1, "prompt": "solo unread:", "max_tokens": n})
    flood = b"".join(frame({"type": "ping", "id": i}) for i in range(2, 200_000))

    def send_flood() -> None:
        with contextlib.suppress(OSError):  # closed while the daemon has stopped reading
            conn.sock.sendall(flood)

    sender = threading.Thread(target=send_flood, daemon=True)
    sender.start()
    with small_batch.client() as client:
        paused = wait_for(client, lambda s: s.sequences_preempted >= 1 and s.queued == 1)
        assert paused.active_sequences == 0
        assert paused.tokens_generated < n
    chunks, end = conn.recv_until_end(1)
    conn.close()
    with small_batch.client() as client:
        assert client.stats().sequences_preempted >= 2  # once at least while it read
    assert end["finish_reason"] == "length"
    text, ids = reference(tiny_model, "solo unread:", n)
    assert [t for c in chunks for t in c["tokens"]] == ids
    assert "".join(c["text"] for c in chunks) == text


def test_a_paused_clients_waiting_requests_do_not_fill_the_queue(tiny_model: Path) -> None:
    """max_queued counts the requests that can start: those of a client that reads. A paused
    client's own are bounded by max_requests_per_connection, and end when it leaves."""
    d = start_daemon(
        short_tmpdir() / "mlxd.sock",
        "--model",
        f"tiny={tiny_model}",
        "--default-model",
        "tiny",
        "--max-batch-size",
        "2",
        "--max-queued",
        "2",
    )
    try:
        greedy = unread_connection(d.socket)
        for i in range(4):  # two places and two in the queue
            greedy.send({"type": "generate", "id": i + 1, "prompt": f"g{i}", "max_tokens": 4000})
        with d.client() as client:
            paused = wait_for(client, lambda s: s.sequences_preempted >= 2 and s.queued == 4)
            assert paused.active_sequences == 0
            # Another client fills both places; a third's request still gets in line.
            busy = RawConn(d.socket)
            for rid in (1, 2):
                busy.send(
                    {"type": "generate", "id": rid, "prompt": f"busy {rid}", "max_tokens": 300}
                )
            wait_for(client, lambda s: s.active_sequences == 2)
            third = client.generate("def third():", max_tokens=4)
            assert third.tokens == reference(tiny_model, "def third():", 4)[1]
            for rid in (1, 2):
                assert busy.recv_until_end(rid)[1]["finish_reason"] == "length"
            busy.close()
            # The paused client leaves: its requests, paused or never started, end.
            greedy.close()
            idle = wait_for(client, lambda s: s.requests_in_flight == 1 and s.queued == 0)
            assert idle.active_sequences == 0
            assert idle.requests_cancelled == 4
    finally:
        code = d.stop()
        shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert code == 0, d.log()


@pytest.mark.parametrize("solo", [True, False], ids=["solo", "batch"])
@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 0.8, "seed": 3, "repetition_penalty": 1.2}],
    ids=["greedy", "seeded"],
)
def test_a_paused_sequence_goes_on_token_exact(
    tiny_model: Path, solo: bool, sampling: dict[str, Any]
) -> None:
    """In-process, on the real model and both of the worker's generators: a sequence taken
    out twice mid-stream (a batch stepping on without it meanwhile) and put back yields the
    tokens of an uninterrupted run, seeded sampling and penalties included."""
    from mlx_lm.generate import BatchGenerator

    from mlxd.daemon.config import Config
    from mlxd.daemon.models import ModelRegistry
    from mlxd.daemon.pausing import can_pause, put_back, take_out
    from mlxd.daemon.sampling import make_sampling
    from mlxd.daemon.solo import SoloGenerator
    from mlxd.protocol import Generate

    loaded = ModelRegistry(Config(models={"tiny": str(tiny_model)})).get("tiny")
    assert can_pause(loaded)
    eos = frozenset(loaded.tokenizer.eos_token_ids)
    n = 120
    req = Generate(id=1, prompt="paused:", max_tokens=n, **sampling)
    prompt = loaded.tokenizer.encode("paused:")

    def make() -> Any:
        if solo:
            return SoloGenerator(loaded.model, eos)
        return BatchGenerator(loaded.model, stop_tokens=[[t] for t in eos], completion_batch_size=4)

    def run(pause_at: tuple[int, ...]) -> list[int]:
        sampler, processors = make_sampling(req, loaded.vocab_size)
        generator = make()
        (uid,) = generator.insert([prompt], [n], [None], [[]], [sampler], [processors])
        if not solo:  # company in the batch, for the whole run
            generator.insert([[5, 6, 7], [9] * 40], max_tokens=[10_000] * 2)
        tokens: list[int] = []
        while True:
            _, responses = generator.next()
            mine = [r for r in responses if r.uid == uid]
            if mine:
                tokens.append(mine[0].token)
                if mine[0].finish_reason is not None:
                    return tokens
            if mine and len(tokens) in pause_at:
                held = take_out(generator, uid, sampler)
                assert held is not None
                if solo:
                    generator = make()
                else:
                    for _ in range(3):
                        generator.next()
                remaining = n - len(tokens)
                uid = put_back(generator, held, remaining, sampler, processors)

    assert run((20, 61)) == run(())
