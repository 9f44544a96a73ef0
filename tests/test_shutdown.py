"""Shutdown and stalls: SIGTERM drains within a grace period, persists the cache and exits 0;
a worker stuck in one round makes the daemon exit non-zero, never a hung socket."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from conftest import Daemon, short_tmpdir, start_daemon
from helpers import RawConn, reference

PROMPTS = [f"def stream_{i}(x):\n    return" for i in range(8)]


def _streams(
    d: Daemon, prompts: list[str], max_tokens: int
) -> tuple[list[threading.Thread], list[dict[str, Any]], threading.Barrier]:
    """One connection per prompt, each streaming in its own thread; the barrier is passed
    once every stream has its first chunk."""
    results: list[dict[str, Any]] = [{} for _ in prompts]
    started = threading.Barrier(len(prompts) + 1, timeout=60)

    def run(i: int) -> None:
        conn = RawConn(d.socket, timeout=60)
        conn.send({"type": "generate", "id": 1, "prompt": prompts[i], "max_tokens": max_tokens})
        tokens: list[int] = []
        first = conn.recv()
        assert first["type"] == "chunk", first
        tokens += first["tokens"]
        started.wait()
        chunks, end = conn.recv_until_end(1)
        results[i] = {"tokens": tokens + [t for c in chunks for t in c["tokens"]], "end": end}
        conn.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return threads, results, started


def test_sigterm_lets_eight_streams_finish_then_persists_the_cache(tiny_model: Path) -> None:
    base = short_tmpdir()
    sock = base / "mlxd.sock"
    d = start_daemon(sock, "--model", f"tiny={tiny_model}", "--shutdown-grace", "60")
    try:
        threads, results, started = _streams(d, PROMPTS, 120)
        started.wait()
        d.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        for prompt, result in zip(PROMPTS, results, strict=True):
            assert result["end"]["type"] == "done", result["end"]
            assert result["tokens"] == reference(tiny_model, prompt, 120)[1]
        assert d.proc.wait(60) == 0, d.log()
        assert not sock.exists()
        saved = list((base / "state" / "prompt-cache").iterdir())
        assert saved, "the prompt cache was not written"

        # The next daemon starts warm: its first request reuses a state saved by the last one.
        again = start_daemon(sock, "--model", f"tiny={tiny_model}")
        with again.client() as client:
            done = client.generate(PROMPTS[3], max_tokens=120)
        assert done.tokens == reference(tiny_model, PROMPTS[3], 120)[1]
        assert done.done.usage.cached_tokens > 0
        assert again.stop() == 0, again.log()
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        shutil.rmtree(base)


def test_past_the_grace_period_streams_end_with_shutting_down(tiny_model: Path) -> None:
    base = short_tmpdir()
    sock = base / "mlxd.sock"
    d = start_daemon(sock, "--model", f"tiny={tiny_model}", "--shutdown-grace", "2")
    try:
        bystander = RawConn(sock)
        threads, results, started = _streams(d, PROMPTS, 30_000)
        started.wait()
        d.proc.send_signal(signal.SIGTERM)
        # Once draining, an open connection's new request is refused, not queued.
        for attempt in range(600):
            bystander.send({"type": "health", "id": 100 + attempt})
            _, reply = bystander.recv_until_end(100 + attempt)
            if reply["health"]["status"] == "draining":
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the daemon never reported draining")
        bystander.send({"type": "generate", "id": 7, "prompt": "late", "max_tokens": 4})
        _, late = bystander.recv_until_end(7)
        assert late["type"] == "error" and late["code"] == "shutting_down"
        for t in threads:
            t.join(60)
        for prompt, result in zip(PROMPTS, results, strict=True):
            end = result["end"]
            assert end["type"] == "error" and end["code"] == "shutting_down", end
            # What was streamed before the end is the solo run's start: nothing mixed.
            solo = reference(tiny_model, prompt, len(result["tokens"]))[1]
            assert result["tokens"] == solo
        assert d.proc.wait(60) == 0, d.log()
        assert not sock.exists()
        assert bystander.is_closed_by_peer()
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        shutil.rmtree(base)


def test_a_stalled_worker_fails_its_requests_and_exits_nonzero(tiny_model: Path) -> None:
    base = short_tmpdir()
    sock = base / "mlxd.sock"
    # Round 1 loads the model at start-up; round 2 takes the generate below and then hangs
    # (3 s), past the 1 s stall timeout.
    d = start_daemon(
        sock,
        "--model", f"tiny={tiny_model}", "--stall-timeout", "1",
        env={"MLXD_FAULTS": "worker_stall@2"},
    )  # fmt: skip
    try:
        conn = RawConn(sock)
        conn.send({"type": "generate", "id": 1, "prompt": "stuck", "max_tokens": 8})
        _, end = conn.recv_until_end(1)
        assert end["type"] == "error" and end["code"] == "worker_unavailable", end
        assert "stuck" in end["message"]
        assert d.proc.wait(30) == 1  # so launchd or systemd restarts it
        assert not sock.exists()
        assert "worker_stalled" in d.log()
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        shutil.rmtree(base)
