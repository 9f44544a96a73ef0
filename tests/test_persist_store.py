"""daemon/persist.py by itself, on real MLX cache objects and real files (no daemon)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache
from test_cache import contents, state_for

from mlxd.daemon.cache import PromptCache
from mlxd.daemon.persist import PromptCacheStore


def store(tmp_path: Path, owner: str = "a.sock") -> PromptCacheStore:
    return PromptCacheStore(tmp_path / "state" / "prompt-cache", owner)


def test_save_and_restore_keep_lru_order_and_skip_foreign_and_corrupt_files(
    tmp_path: Path,
) -> None:
    cache = PromptCache(max_bytes=10**9)
    cache.insert("m", [1, 2, 3, 4], state_for(4))
    cache.insert("m", [7, 8, 9], state_for(3))
    cache.insert("other", [5, 6], state_for(2))
    assert store(tmp_path).save(cache, {"m": "id-1", "other": "id-2"}, max_bytes=10**9) == 3

    restored = PromptCache(max_bytes=10**9)
    assert store(tmp_path).restore(restored, "m", "id-1") == 2
    assert restored.entries() == [("m", (1, 2, 3, 4)), ("m", (7, 8, 9))]  # LRU order kept
    assert contents(restored.fetch("m", [1, 2, 3, 4]).state) == [0.0, 1.0, 2.0]

    assert store(tmp_path).restore(PromptCache(max_bytes=10**9), "m", "other-weights") == 0
    for f in (tmp_path / "state" / "prompt-cache").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:50])  # truncated: corrupt
    assert store(tmp_path).restore(PromptCache(max_bytes=10**9), "m", "id-1") == 0


def test_save_respects_its_size_cap(tmp_path: Path) -> None:
    cache = PromptCache(max_bytes=10**9)
    one = sum(c.nbytes for c in state_for(4)) * 4 // 256  # as cached: compact
    for first in (1, 2, 3):
        cache.insert("m", [first, 0, 0, 0], state_for(4))
    assert store(tmp_path).save(cache, {"m": "x"}, max_bytes=2 * one) == 2
    restored = PromptCache(max_bytes=10**9)
    store(tmp_path).restore(restored, "m", "x")
    assert [k[1][0] for k in restored.entries()] == [2, 3]  # the most recent two


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_every_kv_dtype_round_trips_through_the_check(tmp_path: Path, dtype: mx.Dtype) -> None:
    cache = PromptCache(max_bytes=10**9)
    state = [KVCache() for _ in range(2)]
    for c in state:
        k = mx.random.normal((1, 2, 5, 4)).astype(dtype)
        c.update_and_fetch(k, k)
    keys = mx.array(state[0].keys[..., :5, :])
    cache.insert("m", [1, 2, 3, 4, 5], state)
    assert store(tmp_path).save(cache, {"m": "x"}, max_bytes=10**9) == 1
    restored = PromptCache(max_bytes=10**9)
    assert store(tmp_path).restore(restored, "m", "x") == 1
    got = restored.fetch("m", [1, 2, 3, 4, 5, 6]).state
    assert got[0].keys.dtype == dtype and mx.array_equal(got[0].keys[..., :5, :], keys)


def test_a_model_never_loaded_keeps_its_saved_files(tmp_path: Path) -> None:
    cache = PromptCache(max_bytes=10**9)
    cache.insert("a", [1, 2, 3], state_for(3))
    cache.insert("b", [4, 5, 6], state_for(3))
    assert store(tmp_path).save(cache, {"a": "x", "b": "y"}, max_bytes=10**9) == 2
    # Next life: only "a" is loaded (and restored, and saved again); "b" never is.
    again, second = PromptCache(max_bytes=10**9), store(tmp_path)
    assert second.restore(again, "a", "x") == 1
    again.insert("a", [1, 2, 3], state_for(3))
    assert second.save(again, {"a": "x"}, max_bytes=10**9) == 1
    assert store(tmp_path).restore(PromptCache(max_bytes=10**9), "b", "y") == 1
    folder = tmp_path / "state" / "prompt-cache"
    [manifest] = folder.glob("manifest-*.json")
    listed = {f["name"] for f in json.loads(manifest.read_text())["files"]}
    assert {p.name for p in folder.glob("*.safetensors")} == listed and len(listed) == 2
