"""One memory budget, pinned and warmed prefixes, next-turn cache keys and lanes (issue 8),
each through a real daemon on a real socket."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import RawConn, _load, chat_tokens, reference

from mlxd.client import MlxdError

TINY_WEIGHTS = 410_240  # bytes of the tiny models' weights (bf16)
TINY_KV_PER_TOKEN = 256  # 2 layers x 2 KV heads x 32 dims x (K, V) x 2 bytes


@pytest.fixture(scope="module")
def tiny_model_c(models_root: Path) -> Path:
    from mlxd.daemon.demo_model import build_demo_model

    return build_demo_model(models_root / "tiny-c", size="tiny", seed=2)


@pytest.fixture(scope="module")
def demo_model(models_root: Path) -> Path:
    from mlxd.daemon.demo_model import build_demo_model

    return build_demo_model(models_root / "demo", size="demo", seed=0)


def _stop(d: Daemon, base: Path) -> None:
    try:
        assert d.stop() == 0, d.log()
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def resident(d: Daemon) -> set[str]:
    with d.client() as c:
        return {m.name for m in c.models() if m.resident}


def test_one_budget_evicts_the_lru_idle_model_never_a_running_one(
    tiny_model: Path, tiny_model_b: Path, tiny_model_c: Path
) -> None:
    # Just above two models' weights, one sequence's KV and transient buffers (about
    # 260 KB for the busy one below) and a load's measuring of its model's transient
    # buffers (328 KB), plus the 10% headroom the accounting keeps.
    budget = int((2 * TINY_WEIGHTS + 600_000) / 0.9)
    base = short_tmpdir()
    d = start_daemon(
        base / "mlxd.sock",
        "--model", f"tiny={tiny_model}", "--model", f"tiny-b={tiny_model_b}",
        "--model", f"tiny-c={tiny_model_c}", "--memory-budget", str(budget),
    )  # fmt: skip
    try:
        with d.client() as client:
            assert client.load("tiny").bytes == TINY_WEIGHTS
            client.load("tiny-b")
            client.stats(reset_peak=True)
            # tiny is now the least recently used model, but it is running a sequence.
            result: dict[str, Any] = {}
            busy = threading.Thread(
                target=lambda: result.setdefault(
                    "done", d.client().generate("count:", model="tiny", max_tokens=400)
                )
            )
            busy.start()
            deadline = time.monotonic() + 30
            while client.stats().active_sequences == 0:
                assert time.monotonic() < deadline, "the busy request never started"
            client.load("tiny-c")
            assert resident(d) == {"tiny", "tiny-c"}  # tiny-b went, not the busy tiny
            memory = client.stats().memory
            assert memory is not None and memory.unloaded_models >= 1
            prompt_tokens = len(_load(str(tiny_model))[1].encode("count:"))
            # Set aside at admission: the prompt and all of max_tokens, plus the step of
            # 256 tokens the KV arrays grow by; and room for its transient buffers.
            span = prompt_tokens + 400
            assert memory.by_model["tiny"].live_kv == (span + 256) * TINY_KV_PER_TOKEN
            assert memory.by_model["tiny"].scratch > 0
            busy.join(60)
            assert result["done"].tokens == reference(tiny_model, "count:", 400)[1]

            # A run of mixed requests over the three models: loads, unloads and cached
            # states all come and go under the one budget.
            refs = {"tiny": tiny_model, "tiny-b": tiny_model_b, "tiny-c": tiny_model_c}
            for i in range(9):
                name = ["tiny", "tiny-b", "tiny-c"][i % 3]
                prompt = f"def mixed_{i}(x):"
                done = client.generate(prompt, model=name, max_tokens=60)
                assert done.tokens == reference(refs[name], prompt, 60)[1]
                assert len(resident(d)) <= 2
            memory = client.stats().memory
            assert memory is not None
            assert memory.peak_used_bytes <= budget  # the accounting
            assert memory.mlx_peak_bytes <= budget  # what MLX itself measured
            assert memory.used_bytes == (
                memory.weights_bytes + memory.live_kv_bytes + memory.cached_kv_bytes
            )
            print(
                f"\nbudget {budget} B: MLX peak {memory.mlx_peak_bytes} B, accounted peak "
                f"{memory.peak_used_bytes} B, models unloaded {memory.unloaded_models}, "
                f"cache entries evicted {memory.evicted_entries}"
            )
    finally:
        _stop(d, base)


def test_a_request_that_cannot_fit_gets_insufficient_memory(tiny_model: Path) -> None:
    base = short_tmpdir()
    d = start_daemon(
        base / "mlxd.sock", "--model", f"tiny={tiny_model}",
        "--memory-budget", str(int((TINY_WEIGHTS + 360_000) / 0.9)),  # a load needs 328 KB more
    )  # fmt: skip
    try:
        with d.client() as client:
            with pytest.raises(MlxdError) as info:
                client.generate("hi", model="tiny", max_tokens=2000)  # 580 KB of KV
            assert info.value.code == "insufficient_memory"
            done = client.generate("hi", model="tiny", max_tokens=100)  # 140 KB: fits
            assert done.tokens == reference(tiny_model, "hi", 100)[1]
    finally:
        _stop(d, base)


SYSTEM = "".join(f"# rule {i}: keep the {w} short and clear.\n" for i, w in enumerate("abcdefgh"))


def test_a_pinned_prefix_survives_churn_and_a_restart(tiny_model: Path) -> None:
    base = short_tmpdir()
    sock = base / "mlxd.sock"
    args = ("--model", f"tiny={tiny_model}", "--cache-max-bytes", "120K")
    d = start_daemon(sock, *args)
    try:
        with d.client() as client:
            warmed = client.warm(SYSTEM, model="tiny", pin=True)
            system_tokens = warmed.usage.prompt_tokens
            assert warmed.usage.completion_tokens == 0
            # Churn: more distinct states than the 120 KB cache holds.
            # Each from its first token on its own (a shared start would take, and so
            # replace, the last one's entry).
            words = ["alpha", "delta", "omega", "sigma", "kappa", "gamma", "theta", "zeta"]
            for i in range(24):
                prompt = f"{words[i % 8]} {i} churn " + "x " * 80
                client.generate(prompt, model="tiny", max_tokens=40)
            stats = client.stats()
            assert stats.cache.evictions > 0
            assert stats.memory.pinned_kv_bytes > 0
            prompt = SYSTEM + "def first():"
            done = client.generate(prompt, model="tiny", max_tokens=20)
            assert done.done.usage.cached_tokens >= system_tokens - 1
            assert done.tokens == reference(tiny_model, prompt, 20)[1]
        assert d.stop() == 0, d.log()

        again = start_daemon(sock, *args)  # same state folder: the pin was saved first
        with again.client() as client:
            prompt = SYSTEM + "def second():"
            done = client.generate(prompt, model="tiny", max_tokens=20)
            assert done.done.usage.cached_tokens >= system_tokens - 1
            assert done.tokens == reference(tiny_model, prompt, 20)[1]
            assert client.stats().memory.pinned_kv_bytes > 0  # still pinned after restart
        assert again.stop() == 0, again.log()
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def test_five_chat_turns_each_reuse_the_whole_previous_conversation(demo_model: Path) -> None:
    base = short_tmpdir()
    d = start_daemon(base / "mlxd.sock", "--model", f"demo={demo_model}")
    try:
        messages: list[dict[str, str]] = [
            {"role": "system", "content": "You answer in one line."},
            {"role": "user", "content": "What does a hash map do?"},
        ]
        with d.client() as client:
            previous: list[int] | None = None
            for turn in range(5):
                done = client.chat(messages, model="demo", max_tokens=24)
                cold = reference(demo_model, chat_tokens(demo_model, messages), 24)[1]
                assert done.tokens == cold, f"turn {turn + 1} differs from a cold run"
                if previous is not None:
                    # The whole previous conversation, its reply and end-of-turn included.
                    assert done.done.usage.cached_tokens >= len(previous), turn + 1
                    assert done.done.cache.kind == "shorter"
                messages.append({"role": "assistant", "content": done.text})
                previous = _rendered(demo_model, messages)
                messages.append({"role": "user", "content": f"And question {turn + 2}?"})
    finally:
        _stop(d, base)


def _rendered(model_dir: Path, messages: list[dict[str, str]]) -> list[int]:
    _, tokenizer = _load(str(model_dir))
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=False))


def _frames_until(conn: RawConn, stop: Any) -> list[dict[str, Any]]:
    frames = []
    while True:
        m = conn.recv()
        frames.append(m)
        if stop(m, frames):
            return frames


def test_an_interactive_request_goes_ahead_of_background_work(tiny_model: Path) -> None:
    base = short_tmpdir()
    d = start_daemon(base / "mlxd.sock", "--model", f"tiny={tiny_model}", "--max-batch-size", "2")
    try:
        conn = RawConn(d.socket)
        for i in range(1, 9):
            conn.send(
                {"type": "generate", "id": i, "prompt": f"bulk {i}", "max_tokens": 150,
                 "priority": "background", "cache": False}
            )  # fmt: skip
        conn.send({"type": "generate", "id": 9, "prompt": "now", "max_tokens": 5, "cache": False})
        frames = _frames_until(conn, lambda m, _: m.get("id") == 9 and m["type"] == "chunk")
        finished_before = [m["id"] for m in frames if m["type"] == "done"]
        assert len(finished_before) < 4, finished_before  # before most of the eight
        done = set(finished_before)
        tokens: dict[int, list[int]] = {}
        for m in frames:
            if m["type"] == "chunk":
                tokens.setdefault(m["id"], []).extend(m["tokens"])
        while len(done) < 9:
            m = conn.recv()
            if m["type"] == "chunk":
                tokens.setdefault(m["id"], []).extend(m["tokens"])
            elif m["type"] == "done":
                done.add(m["id"])
            assert m["type"] != "error", m
        for i in range(1, 9):
            assert tokens[i] == reference(tiny_model, f"bulk {i}", 150)[1]
        assert tokens[9] == reference(tiny_model, "now", 5)[1]
    finally:
        _stop(d, base)


def test_background_work_ages_into_the_interactive_lane(tiny_model: Path) -> None:
    base = short_tmpdir()
    d = start_daemon(
        base / "mlxd.sock", "--model", f"tiny={tiny_model}",
        "--max-batch-size", "1", "--background-aging", "0.1",
    )  # fmt: skip
    try:
        conn = RawConn(d.socket)
        conn.send({"type": "generate", "id": 1, "prompt": "a", "max_tokens": 600, "cache": False})
        conn.send(
            {"type": "generate", "id": 2, "prompt": "bulk", "max_tokens": 5,
             "priority": "background", "cache": False}
        )  # fmt: skip
        for i in range(3, 8):  # a stream of interactive work that would starve it
            conn.send(
                {"type": "generate", "id": i, "prompt": "b", "max_tokens": 600, "cache": False}
            )
        frames = _frames_until(conn, lambda m, _: m.get("id") == 2 and m["type"] == "done")
        finished_before = [m["id"] for m in frames if m["type"] == "done"]
        assert finished_before[-1] == 2
        # Aged while the first one ran: it went before the interactive requests behind it.
        assert len(finished_before) <= 3, finished_before
        conn.close()
    finally:
        _stop(d, base)


@pytest.mark.parametrize("priority", ["background", "interactive"])
def test_background_work_that_must_share_takes_no_interactive_cache_entry(
    tiny_model: Path, priority: str
) -> None:
    """Under a budget with room for one bulk sequence beside an editor's cached state but
    not two, background bulk work waits for room rather than evict that state: the
    editor's next keystroke is served from it. The same work marked interactive (a server
    without lanes) evicts it."""
    from mlxd.daemon.config import Config
    from mlxd.daemon.memory import Footprint, generator_bytes
    from mlxd.daemon.models import ModelRegistry

    loaded = ModelRegistry(Config(models={"tiny": str(tiny_model)})).get("tiny")
    editor = "".join(f"x{i} = {i}\n" for i in range(8))
    editor_tokens = len(loaded.tokenizer.encode(editor))
    entry = (editor_tokens + 8) * TINY_KV_PER_TOKEN  # its state, cached compact
    bulk = Footprint(span=len(loaded.tokenizer.encode("bulk 1")) + 400, prefill=4, context=4)
    one = sum(generator_bytes(loaded, [bulk], 8))
    second = sum(generator_bytes(loaded, [bulk, bulk], 8)) - one
    # Room for the editor's state and one bulk sequence, and half of a second one.
    budget = int((TINY_WEIGHTS + entry + one + second // 2) / 0.9)
    base = short_tmpdir()
    d = start_daemon(
        base / "mlxd.sock", "--model", f"tiny={tiny_model}", "--memory-budget", str(budget)
    )
    try:
        with d.client() as client:
            assert client.generate(editor, model="tiny", max_tokens=8).done.usage.cached_tokens == 0
            conn = RawConn(d.socket)
            for i in range(1, 5):
                conn.send(
                    {"type": "generate", "id": i, "prompt": f"bulk {i}", "max_tokens": 400,
                     "priority": priority}
                )  # fmt: skip
            frames = _frames_until(
                conn, lambda _, frames: sum(f["type"] == "done" for f in frames) == 4
            )
            assert not [f for f in frames if f["type"] == "error"]
            conn.close()
            keystroke = editor + "x8 ="
            done = client.generate(keystroke, model="tiny", max_tokens=8)
            assert done.tokens == reference(tiny_model, keystroke, 8)[1]
            if priority == "background":
                assert done.done.usage.cached_tokens >= editor_tokens - 1
            else:
                assert done.done.usage.cached_tokens < editor_tokens - 1
    finally:
        _stop(d, base)


@pytest.mark.parametrize(
    "lengths",
    [[20], [300], [300] * 4, [40] * 8, [30, 200, 500], [700, 20], [20] * 32],
    ids=["one-short", "one-300", "four-300", "eight-40", "mixed", "long-and-short", "32-short"],
)
def test_set_aside_bytes_bound_what_mlx_allocates_in_a_batch(
    tiny_model: Path, lengths: list[int]
) -> None:
    """The budget's charge for a generator's sequences (KV as laid out, plus the transient
    buffers measured at load) is at least MLX's own peak while BatchGenerator prefills and
    decodes them, in-process on the real model, stepped as the worker steps it (the states
    of sequences that end are evaluated at once, and prefilled in groups of 8)."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from mlxd.daemon.config import Config
    from mlxd.daemon.memory import Footprint, generator_bytes
    from mlxd.daemon.models import ModelRegistry

    loaded = ModelRegistry(Config(models={"tiny": str(tiny_model)})).get("tiny")
    step, max_tokens = 256, 8
    group = min(8, len(lengths))
    generator = BatchGenerator(
        loaded.model,
        stop_tokens=[],
        completion_batch_size=len(lengths),
        prefill_batch_size=group,
        prefill_step_size=step,
    )
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(n)] for i, n in enumerate(lengths)]
    footprints = [Footprint(span=n + max_tokens, prefill=min(step, n), context=n) for n in lengths]
    kv, scratch = generator_bytes(loaded, footprints, prefill_batch=group)
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    generator.insert(prompts, max_tokens=[max_tokens] * len(lengths))
    finished = 0
    while finished < len(lengths):
        _, responses = generator.next()
        ended = [r.prompt_cache for r in responses if r.finish_reason is not None]
        mx.eval([c.state for state in ended for c in state])
        finished += len(ended)
    peak = mx.get_peak_memory() - base
    generator.close()
    print(f"\n{lengths}: MLX peak {peak} B, set aside {kv} + {scratch} B")
    assert peak <= kv + scratch
    assert kv + scratch <= 3 * peak  # a bound, not a blanket refusal
