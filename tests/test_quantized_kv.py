"""Quantized KV (issue 18, item 3): a model's ``kv_bits`` and the prompt cache's quantized
entries give exactly mlx-lm's own quantized-KV generation, are charged their real size,
and persist.

The model here is the project's "small" build: its head dimension (32) is one mlx's
quantization groups divide (the "tiny" one's, 16, is not), so the group size is 32.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import short_tmpdir, start_daemon
from helpers import _load

from mlxd.client import AsyncClient

BITS, GROUP = 4, 32
PREFILL_STEP = 512  # the daemon's default limits.prefill_step_size
STORED = list(range(10, 90))  # a warmed prompt
EXTENDED = STORED + list(range(200, 230))  # a prompt that starts with it
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def small_model(models_root: Path) -> Path:
    from mlxd.daemon.demo_model import build_demo_model

    return build_demo_model(models_root / "small", size="small", seed=0)


def _tokens(steps: Any, n: int) -> list[int]:
    out = []
    for token, _ in steps:
        out.append(int(token))
        if len(out) == n:
            break
    return out


def quantized_generation(model_dir: Path, prompt: list[int], n: int = MAX_TOKENS) -> list[int]:
    """mlx-lm's quantized-KV greedy generation, quantized from the first token."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, _ = _load(str(model_dir))
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=n,
        kv_bits=BITS,
        kv_group_size=GROUP,
        quantized_kv_start=0,
        prefill_step_size=PREFILL_STEP,
    )
    return _tokens(steps, n)


def quantized_cache(model_dir: Path, stored: list[int]) -> tuple[Any, list[Any]]:
    """mlx-lm's prompt cache of ``stored`` (``mlx_lm.cache_prompt``'s ``generate_step``
    with ``max_tokens=0``), each layer turned by mlx-lm's ``KVCache.to_quantized``."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = _load(str(model_dir))
    cache = make_prompt_cache(model)
    for _ in generate_step(
        mx.array(stored), model, max_tokens=0, prompt_cache=cache, prefill_step_size=PREFILL_STEP
    ):
        pass
    cache = [c.to_quantized(group_size=GROUP, bits=BITS) for c in cache]
    mx.eval([c.state for c in cache])
    return model, cache


def hit_reference(model_dir: Path, stored: list[int], prompt: list[int]) -> list[int]:
    """What a hit on the quantized entry of ``stored`` must give for ``prompt``: mlx-lm's
    ``generate_step`` continuing that quantized cache with the same ``kv_bits`` (trimmed
    first by the one token an exact hit processes again)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import trim_prompt_cache

    model, cache = quantized_cache(model_dir, stored)
    reused = min(len(stored), len(prompt) - 1)
    trim_prompt_cache(cache, len(stored) - reused)
    steps = generate_step(
        mx.array(prompt[reused:]),
        model,
        max_tokens=MAX_TOKENS,
        prompt_cache=cache,
        kv_bits=BITS,
        kv_group_size=GROUP,
        quantized_kv_start=0,
        prefill_step_size=PREFILL_STEP,
    )
    return _tokens(steps, MAX_TOKENS)


def plain_generation(model_dir: Path, prompt: list[int]) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, _ = _load(str(model_dir))
    return _tokens(generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS), MAX_TOKENS)


def quantized_bytes(model_dir: Path, stored: list[int]) -> int:
    """The quantized entry's bytes: its arrays cut to its tokens (mlx-lm's grow by 256)."""
    _, cache = quantized_cache(model_dir, stored)
    n = len(stored)
    return sum(a[..., :n, :].nbytes for c in cache for a in (*c.keys, *c.values))


def _config(base: Path, text: str) -> dict[str, str]:
    path = base / "config.toml"
    path.write_text(text)
    return {"MLXD_CONFIG": str(path)}


def test_a_kv_bits_model_generates_as_mlx_lm_quantized(small_model: Path) -> None:
    base = short_tmpdir()
    env = _config(
        base,
        f'[models]\nsmall = "{small_model}"\n\n'
        f"[model_options.small]\nkv_bits = {BITS}\nkv_group_size = {GROUP}\n",
    )
    d = start_daemon(base / "mlxd.sock", "--no-cache-persist", env=env)
    try:
        with d.client() as client:
            out = client.generate(tokens=EXTENDED, max_tokens=MAX_TOKENS, cache=False)
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(base, ignore_errors=True)
    expected = quantized_generation(small_model, EXTENDED)
    assert out.tokens == expected
    # Not a vacuous equality: 4-bit KV changes this random model's greedy output.
    assert expected != plain_generation(small_model, EXTENDED)


def test_a_hit_on_a_quantized_entry_gives_mlx_lms_quantized_continuation(
    small_model: Path,
) -> None:
    base = short_tmpdir()
    args = ("--model", f"small={small_model}", "--no-cache-persist")
    quant = ("--cache-kv-bits", str(BITS), "--cache-kv-group-size", str(GROUP))
    d = start_daemon(base / "mlxd.sock", *args, *quant)
    try:
        with d.client() as client:
            client.warm(tokens=STORED)
            stats = client.stats()
            charged = stats.cache.bytes, stats.memory.cached_kv_bytes
            shorter = client.generate(tokens=EXTENDED, max_tokens=MAX_TOKENS)
            client.clear_cache()
            client.warm(tokens=STORED)
            exact = client.generate(tokens=STORED, max_tokens=MAX_TOKENS)
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(base, ignore_errors=True)
    # Charged its quantized size, in the cache's count and in the memory budget.
    assert charged == (quantized_bytes(small_model, STORED),) * 2
    assert shorter.done.cache.kind == "shorter"
    assert shorter.done.usage.cached_tokens == len(STORED)
    assert shorter.tokens == hit_reference(small_model, STORED, EXTENDED)
    assert shorter.tokens != plain_generation(small_model, EXTENDED)  # quantized it was
    assert exact.done.cache.kind == "exact"
    assert exact.tokens == hit_reference(small_model, STORED, STORED)


def test_quantized_entries_persist_and_reload(small_model: Path) -> None:
    base = short_tmpdir()
    sock = base / "mlxd.sock"
    args = ("--model", f"small={small_model}", "--state-dir", str(base / "state"))
    quant = ("--cache-kv-bits", str(BITS), "--cache-kv-group-size", str(GROUP))
    size = quantized_bytes(small_model, STORED)
    try:
        d = start_daemon(sock, *args, *quant)
        with d.client() as client:
            client.warm(tokens=STORED)
        assert d.stop() == 0, d.log()
        # Restored as saved, quantized, under any cache.kv_bits: here with it off.
        d = start_daemon(sock, *args)
        with d.client() as client:
            client.load("small")
            restored = client.stats().cache.bytes
            plain = client.generate(tokens=EXTENDED, max_tokens=MAX_TOKENS, cache=False)
            hit = client.generate(tokens=EXTENDED, max_tokens=MAX_TOKENS)
        assert d.stop() == 0, d.log()
        assert restored == size
        assert hit.done.cache.kind == "shorter"
        assert hit.tokens == hit_reference(small_model, STORED, EXTENDED)
        assert plain.tokens == plain_generation(small_model, EXTENDED)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_quantized_states_in_a_batch_run_dequantized(small_model: Path) -> None:
    """Sequences decoded together (mlx-lm's ``BatchGenerator``, which has no quantized
    cache) take a quantized entry dequantized, and a ``kv_bits`` model's run plain: they
    all finish, from the entry."""
    base = short_tmpdir()
    env = _config(
        base,
        f'[models]\nsmall = "{small_model}"\n\n[cache]\nkv_bits = {BITS}\n'
        f"kv_group_size = {GROUP}\n\n[model_options.small]\nkv_bits = {BITS}\n"
        f"kv_group_size = {GROUP}\n",
    )
    d = start_daemon(base / "mlxd.sock", "--no-cache-persist", env=env)
    done: dict[int, Any] = {}
    try:
        async with AsyncClient(d.socket) as client:
            await client.warm(tokens=STORED, pin=True)

            async def one(i: int) -> None:
                done[i] = await client.generate(tokens=[*STORED, 300 + i], max_tokens=MAX_TOKENS)

            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(one, i)
            health = await client.health()
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(base, ignore_errors=True)
    assert health.status == "ok"
    for i in range(4):
        assert done[i].done.usage.cached_tokens == len(STORED), i
        assert len(done[i].tokens) == MAX_TOKENS or done[i].done.finish_reason == "stop"
