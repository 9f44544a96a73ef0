"""Resident models: explicit load and unload, keep-alive, LRU unloading under a budget."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import Daemon, short_tmpdir, start_daemon

from mlxd.client import Client, MlxdError, ModelLoadError


def resident(client: Client) -> dict[str, int]:
    return {m.name: m.bytes for m in client.models() if m.resident}


@pytest.fixture
def fresh_daemon(request: pytest.FixtureRequest, tiny_model: Path, tiny_model_b: Path):
    """A daemon of its own, for tests that change what is resident."""
    args = getattr(request, "param", ())
    base = short_tmpdir()
    (base / "models").mkdir()
    (base / "models" / "broken").mkdir()
    (base / "models" / "broken" / "config.json").write_text("{}")
    # A real model's files, each broken one way: weights missing, weights corrupt, and an
    # architecture mlx-lm does not have.
    for name in ("no-weights", "corrupt", "alien"):
        shutil.copytree(tiny_model, base / "models" / name)
    for f in (base / "models" / "no-weights").glob("*.safetensors"):
        f.unlink()
    for f in (base / "models" / "corrupt").glob("*.safetensors"):
        f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    alien = base / "models" / "alien" / "config.json"
    alien.write_text(alien.read_text().replace('"llama"', '"no_such_architecture"'))
    d = start_daemon(
        base / "mlxd.sock",
        "--model", f"tiny={tiny_model}",
        "--model", f"tiny-b={tiny_model_b}",
        "--models-dir", str(base / "models"),
        *args,
    )  # fmt: skip
    yield d
    assert d.stop() == 0, d.log()
    shutil.rmtree(base)


def test_load_unload_and_list(fresh_daemon: Daemon, tiny_model_b: Path) -> None:
    with fresh_daemon.client() as client:
        info = client.load("tiny-b", keep_alive=-1)
        assert info.resident and info.bytes > 0 and info.path == str(tiny_model_b)
        assert "tiny-b" in resident(client)
        listed = {m.name: m for m in client.models()}
        assert listed["tiny-b"].keep_alive_s == -1 and listed["tiny-b"].last_used
        client.unload("tiny-b")
        assert "tiny-b" not in resident(client)
        assert not listed["broken"].resident  # known from --models-dir, not loaded


def test_keep_alive_zero_unloads_after_the_request(fresh_daemon: Daemon) -> None:
    with fresh_daemon.client() as client:
        client.generate("hi", model="tiny-b", max_tokens=3, keep_alive=0)
        deadline = time.monotonic() + 10
        while "tiny-b" in resident(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "tiny-b" not in resident(client)
        client.generate("hi", model="tiny-b", max_tokens=3, keep_alive=60)
        time.sleep(0.3)
        assert "tiny-b" in resident(client)


def test_a_model_that_fails_to_load_fails_its_requests_only(fresh_daemon: Daemon) -> None:
    import threading

    with fresh_daemon.client() as client:
        # Another model's stream runs all along, and must not notice.
        result: dict[str, object] = {}
        busy = threading.Thread(
            target=lambda: result.setdefault(
                "done", fresh_daemon.client().generate("x", model="tiny", max_tokens=400)
            )
        )
        busy.start()
        for name in ("broken", "no-weights", "corrupt", "alien"):
            with pytest.raises(ModelLoadError) as info:
                client.generate("hi", model=name, max_tokens=3)
            assert info.value.code == "model_load_failed", name
            assert name in info.value.message
        busy.join(60)
        assert result["done"].done.finish_reason == "length"  # type: ignore[attr-defined]
        assert client.generate("hi", model="tiny-b", max_tokens=3).done.finish_reason == "length"
        assert client.stats().worker_alive


# One tiny model's weights (410 KB) and, while it loads, its probe (328 KB) fit; two do not.
@pytest.mark.parametrize("fresh_daemon", [("--memory-budget", "900K")], indirect=True)
def test_a_load_that_would_exceed_the_budget_is_refused(fresh_daemon: Daemon) -> None:
    import threading

    with fresh_daemon.client() as client:
        client.load("tiny")
        # tiny is busy, so it cannot make room: tiny-b would take the weights over budget.
        busy = threading.Thread(
            # 400 tokens of KV (256 B each, in 256-token steps) and its transient buffers
            # (265 KB in all) fit beside tiny's 410 KB of weights, under the budget less its
            # 10% headroom.
            target=lambda: fresh_daemon.client().generate("x", model="tiny", max_tokens=400)
        )
        busy.start()
        deadline = time.monotonic() + 30
        while client.stats().active_sequences == 0:
            assert time.monotonic() < deadline, "the busy request never started"
            time.sleep(0.01)
        with pytest.raises(MlxdError) as info:
            client.load("tiny-b")
        assert info.value.code == "insufficient_memory"
        assert "budget" in info.value.message
        assert set(resident(client)) == {"tiny"}
        busy.join(60)
        client.load("tiny-b")  # tiny is idle now: it makes room
        assert set(resident(client)) == {"tiny-b"}


# One tiny model's weights (410 KB) and, while it loads, its probe (328 KB) fit; two do not.
@pytest.mark.parametrize("fresh_daemon", [("--memory-budget", "900K")], indirect=True)
def test_lru_model_is_unloaded_when_the_budget_would_be_exceeded(fresh_daemon: Daemon) -> None:
    with fresh_daemon.client() as client:
        size = client.load("tiny").bytes
        assert size < 600 * 1024 < 2 * size, "the budget must fit one tiny model, not two"
        client.load("tiny-b")
        assert set(resident(client)) == {"tiny-b"}
        client.generate("hi", model="tiny", max_tokens=2)
        assert set(resident(client)) == {"tiny"}


def test_keep_alive_expires_while_another_model_is_busy(fresh_daemon: Daemon) -> None:
    import threading

    with fresh_daemon.client() as client:
        client.generate("hi", model="tiny-b", max_tokens=2, keep_alive=0.5)
        busy = threading.Thread(
            target=lambda: fresh_daemon.client().generate("x", model="tiny", max_tokens=4000)
        )
        busy.start()
        time.sleep(0.2)
        assert "tiny-b" in resident(client)
        deadline = time.monotonic() + 10
        while "tiny-b" in resident(client) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "tiny-b" not in resident(client)
        assert client.stats().active_sequences == 1  # the busy one is still generating
        busy.join(60)
