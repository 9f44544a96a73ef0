"""Failures inside the daemon (injected with MLXD_FAULTS) stay contained, or end the
daemon loudly: never a hung socket."""

from __future__ import annotations

import select
import shutil
import signal
import threading
import time
from pathlib import Path

from conftest import short_tmpdir, start_daemon
from helpers import RawConn, reference

from mlxd.client import MlxdError


def test_a_failing_batch_step_fails_its_requests_only(tiny_model: Path, tiny_model_b: Path) -> None:
    base = short_tmpdir()
    d = start_daemon(
        base / "mlxd.sock",
        "--model", f"tiny={tiny_model}", "--model", f"tiny-b={tiny_model_b}",
        env={"MLXD_FAULTS": "step_error:tiny@20"},
    )  # fmt: skip
    try:
        result: dict[str, object] = {}

        def other_model() -> None:
            with d.client() as c:
                result["b"] = c.generate("def other():", model="tiny-b", max_tokens=300)

        t = threading.Thread(target=other_model)
        t.start()
        time.sleep(0.05)
        with d.client() as client:
            try:
                client.generate("def doomed():", model="tiny", max_tokens=300)
                raise AssertionError("the injected fault did not fail the request")
            except MlxdError as exc:
                assert exc.code == "internal_error" and "injected" in exc.message
            t.join(60)
            # The other model's stream went on, unchanged; the worker serves the next one.
            done = result["b"]
            assert done.tokens == reference(tiny_model_b, "def other():", 300)[1]  # type: ignore[attr-defined]
            again = client.generate("def fine():", model="tiny", max_tokens=16)
            assert again.tokens == reference(tiny_model, "def fine():", 16)[1]
            assert client.stats().worker_alive
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(base)


def test_a_dead_worker_fails_in_flight_requests_and_exits_nonzero(tiny_model: Path) -> None:
    base = short_tmpdir()
    sock = base / "mlxd.sock"
    d = start_daemon(sock, "--model", f"tiny={tiny_model}", env={"MLXD_FAULTS": "worker_crash@200"})
    conn = RawConn(sock)
    conn.send({"type": "generate", "id": 1, "prompt": "count:", "max_tokens": 30_000})
    _, end = conn.recv_until_end(1)
    assert end["type"] == "error" and end["code"] == "worker_unavailable"
    assert d.proc.wait(30) == 1  # so launchd or systemd restarts it
    assert conn.is_closed_by_peer()
    assert not sock.exists()
    assert "worker_died" in d.log()
    shutil.rmtree(base)


def test_health_answers_from_the_loop_while_the_worker_is_busy(tiny_model: Path) -> None:
    base = short_tmpdir()
    # Round 1 loads the model at start-up; round 2 is the stats request below.
    d = start_daemon(
        base / "mlxd.sock", "--model", f"tiny={tiny_model}", env={"MLXD_FAULTS": "worker_stall@2"}
    )
    try:
        stalled = RawConn(d.socket)
        with d.client() as client:
            stalled.send({"type": "stats", "id": 99})  # the worker is now stuck for 3 s
            time.sleep(0.5)
            health = client.health()
            # Answered while the worker still held the stats request: its reply has not come.
            assert not select.select([stalled.sock], [], [], 0)[0]
            assert health.status == "ok" and health.worker_alive
            assert health.worker_busy_s > 0.3
            assert health.models_resident == ["tiny"]
            _, stats = stalled.recv_until_end(99)
            assert stats["type"] == "done"
            assert client.health().worker_busy_s < 1.0  # idle again
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(base)


def test_a_stopped_process_is_not_a_stalled_worker(tiny_model: Path) -> None:
    base = short_tmpdir()
    d = start_daemon(base / "mlxd.sock", "--model", f"tiny={tiny_model}", "--stall-timeout", "2")
    try:
        conns = [RawConn(d.socket) for _ in range(3)]
        for i, conn in enumerate(conns):
            conn.send({"type": "generate", "id": 1, "prompt": f"def s{i}():", "max_tokens": 3000})
        for conn in conns:
            while conn.recv()["type"] != "chunk":  # streaming: the worker is mid-round
                pass
        # Ctrl-Z for three times the stall timeout: the worker was stopped, not stuck.
        d.proc.send_signal(signal.SIGSTOP)
        time.sleep(6)
        d.proc.send_signal(signal.SIGCONT)
        for conn in conns:
            _, end = conn.recv_until_end(1)
            assert end["type"] == "done" and end["finish_reason"] in ("length", "stop"), end
            conn.close()
        with d.client() as client:
            assert client.health().status == "ok"
        assert "worker_stalled" not in d.log()
    finally:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGCONT)
        assert d.stop() == 0, d.log()
        shutil.rmtree(base)
