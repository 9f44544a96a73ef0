"""The prompt cache by itself, on real MLX cache objects (no daemon)."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlxd.daemon.cache import PromptCache, cache_length, fork

LAYERS, HEADS, DIM = 2, 2, 4


def positions(start: int, n: int) -> mx.array:
    """Keys whose every value is the token position: contents are easy to check."""
    pos = mx.arange(start, start + n, dtype=mx.float32)
    return mx.broadcast_to(pos[None, None, :, None], (1, HEADS, n, DIM))


def state_for(n: int, cls: type = KVCache, **kwargs: int) -> list:
    state = [cls(**kwargs) for _ in range(LAYERS)]
    extend(state, 0, n)
    return state


def extend(state: list, start: int, n: int, marker: float = 0.0) -> None:
    for c in state:
        k = positions(start, n) + marker
        c.update_and_fetch(k, k)


def contents(state: list) -> list[float]:
    keys, _ = (
        state[0].keys_and_values() if hasattr(state[0], "keys_and_values") else state[0].state[:2]
    )
    return keys[0, 0, :, 0].tolist()


def test_every_lookup_mode() -> None:
    cache = PromptCache(max_bytes=10**9)
    stored = list(range(100, 120))
    assert cache.fetch("m", stored).kind == "miss"
    assert cache.fetch("m", stored).miss_reason == "nothing is cached for this model"

    cache.insert("m", stored, state_for(20))
    exact = cache.fetch("m", stored)
    assert (exact.kind, exact.reused) == ("exact", 19)  # the last token is processed again
    assert cache_length(exact.state) == 19 and contents(exact.state) == list(range(19))

    cache.insert("m", stored, state_for(20))
    longer_prompt = [*stored, 1, 2, 3]
    shorter = cache.fetch("m", longer_prompt)
    assert (shorter.kind, shorter.reused) == ("shorter", 20)

    cache.insert("m", stored, state_for(20))
    prefix = stored[:12]
    trimmed = cache.fetch("m", prefix)
    assert (trimmed.kind, trimmed.reused) == ("longer", 11)
    assert contents(trimmed.state) == list(range(11))

    cache.insert("m", stored, state_for(20))
    diverging = [*stored[:8], 999, 998]
    longer = cache.fetch("m", diverging)
    assert (longer.kind, longer.reused) == ("longer", 8)

    cache.insert("m", stored, state_for(20))
    unrelated = cache.fetch("m", [1, 2, 3])
    assert unrelated.kind == "miss" and unrelated.state is None
    assert unrelated.miss_reason == "no cached prompt shares a prefix with this one"
    assert cache.counters.hits == {"exact": 1, "shorter": 1, "longer": 2, "miss": 3}


def test_models_are_namespaced() -> None:
    cache = PromptCache(max_bytes=10**9)
    cache.insert("a", [1, 2, 3, 4], state_for(4))
    assert cache.fetch("b", [1, 2, 3, 4]).kind == "miss"
    assert cache.fetch("a", [1, 2, 3, 4]).kind == "exact"


def test_a_taken_entry_is_gone_until_given_back() -> None:
    cache = PromptCache(max_bytes=10**9)
    cache.insert("m", [1, 2, 3, 4], state_for(4))
    first = cache.fetch("m", [1, 2, 3, 4])
    assert first.kind == "exact" and len(cache) == 0
    assert cache.fetch("m", [1, 2, 3, 4]).kind == "miss"  # never visible twice
    extend(first.state, 3, 3)
    cache.insert("m", [1, 2, 3, 4, 5, 6], first.state)
    assert cache.fetch("m", [1, 2, 3, 4, 5, 6, 7]).reused == 6


def test_a_longer_entry_is_taken_only_when_most_of_it_is_reused() -> None:
    cache = PromptCache(max_bytes=10**9)
    stored = list(range(100, 120))
    cache.insert("m", stored, state_for(20))
    # Another "file" with the same first two tokens: a fork of them; the entry stays whole.
    other = cache.fetch("m", [*stored[:2], 7, 8, 9])
    assert (other.kind, other.reused) == ("longer", 2) and cache.counters.forks == 1
    assert cache.entries() == [("m", tuple(stored))]
    extend(other.state, 2, 3, marker=1000.0)
    cache.insert("m", [*stored[:2], 7, 8, 9], other.state)
    assert len(cache) == 2  # stored beside it, not instead of it
    again = cache.fetch("m", stored)
    assert (again.kind, again.reused) == ("exact", 19)
    assert contents(again.state) == list(range(19))  # the fork wrote nothing into it
    # Keeping at least as much as is trimmed away takes the entry (no copy).
    cache.insert("m", stored, again.state)
    taken = cache.fetch("m", [*stored[:10], 5])
    assert (taken.kind, taken.reused) == ("longer", 10)
    assert ("m", tuple(stored)) not in cache.entries()


def test_two_live_sequences_on_one_prefix_get_independent_states() -> None:
    cache = PromptCache(max_bytes=10**9)
    prompt = list(range(10))
    live = state_for(10)
    lease = cache.lease("m", prompt, live)
    other = cache.fetch("m", [*prompt[:6], 50, 51])
    assert (other.kind, other.reused) == ("longer", 6)
    assert cache.counters.forks == 1
    # Both write different tokens after the shared prefix.
    extend(live, 10, 2, marker=1000.0)
    extend(other.state, 6, 2, marker=2000.0)
    mx.eval([c.state for c in live + other.state])
    assert contents(live) == [*range(10), 1010.0, 1011.0]
    assert contents(other.state) == [*range(6), 2006.0, 2007.0]
    cache.release(lease)
    assert cache.fetch("m", prompt).kind == "miss"


def test_a_cached_state_holds_its_tokens_compactly() -> None:
    state = state_for(4)  # KVCache arrays grow in 256-token steps: 4 tokens in 256 places
    grown = sum(c.nbytes for c in state)
    cache = PromptCache(max_bytes=10**9)
    assert cache.insert("m", [1, 2, 3, 4], state)
    assert cache.nbytes == grown * 4 // 256
    assert [c.keys.shape[2] for c in state] == [4] * len(state)
    assert cache.fetch("m", [1, 2, 3, 4, 5]).reused == 4


def test_a_state_taken_out_of_a_batch_owns_exactly_its_bytes_once_cached() -> None:
    # What BatchGenerator.remove(..., return_prompt_caches=True) hands back: one row of the
    # batch's arrays, as long as its offset (so no compaction), whether still lazy (as
    # remove returns it) or already evaluated (a row slice is then a view of the batch).
    for lazy in (True, False):
        batch = mx.concatenate([positions(0, 256)] * 8)
        mx.eval(batch)
        state = []
        for _ in range(LAYERS):
            c = KVCache()
            c.keys, c.values, c.offset = batch[3:4], batch[3:4], 256
            if not lazy:
                mx.eval(c.keys, c.values)
            state.append(c)
        cache = PromptCache(max_bytes=10**9)
        assert cache.insert("m", list(range(256)), state)
        before = mx.get_active_memory()
        del batch, c
        freed = before - mx.get_active_memory()
        assert freed == 8 * HEADS * 256 * DIM * 4, (lazy, freed)  # the whole batch went
        assert contents(cache.fetch("m", list(range(257))).state) == list(range(256))


def test_lru_eviction_by_count_and_by_bytes() -> None:
    one = sum(c.nbytes for c in state_for(4)) * 4 // 256  # as cached: compact
    cache = PromptCache(max_bytes=10**9, max_entries=2)
    for first in (1, 2, 3):
        cache.insert("m", [first, 0, 0, 0], state_for(4))
    assert cache.entries() == [("m", (2, 0, 0, 0)), ("m", (3, 0, 0, 0))]
    assert cache.counters.evictions == 1

    cache = PromptCache(max_bytes=2 * one)
    for first in (1, 2, 3):
        cache.insert("m", [first, 0, 0, 0], state_for(4))
    assert [k[1][0] for k in cache.entries()] == [2, 3]
    assert cache.nbytes <= 2 * one


def test_a_state_over_the_whole_budget_is_not_cached() -> None:
    cache = PromptCache(max_bytes=100)
    assert not cache.insert("m", [1, 2, 3], state_for(3))
    assert len(cache) == 0 and cache.counters.not_cached_too_large == 1


def test_a_longer_trimmable_entry_replaces_its_prefixes() -> None:
    cache = PromptCache(max_bytes=10**9)
    cache.insert("m", [1, 2, 3], state_for(3))
    cache.insert("m", [1, 2, 3, 4, 5], state_for(5))
    assert cache.entries() == [("m", (1, 2, 3, 4, 5))]
    assert cache.bytes_by_model() == {"m": sum(c.nbytes for c in state_for(5)) * 5 // 256}


def test_a_state_holding_more_than_its_key_is_trimmed_to_it() -> None:
    cache = PromptCache(max_bytes=10**9)
    state = state_for(7)  # e.g. decoding ran one step ahead
    cache.insert("m", [1, 2, 3, 4, 5], state)
    assert cache_length(state) == 5


def test_an_untrimmable_longer_entry_is_a_miss_with_its_reason() -> None:
    cache = PromptCache(max_bytes=10**9)
    full = state_for(8, RotatingKVCache, max_size=4)
    assert not full[0].is_trimmable()
    cache.insert("m", list(range(8)), full)
    result = cache.fetch("m", [0, 1, 2, 9])
    assert result.kind == "miss"
    assert result.miss_reason == "the only entry sharing a prefix cannot be trimmed"


def test_fork_is_a_view_not_a_copy() -> None:
    state = state_for(300)
    mx.eval([c.state for c in state])
    before = mx.get_active_memory()
    forked = fork(state, 200)
    assert mx.get_active_memory() - before < sum(c.nbytes for c in state) // 4
    assert contents(forked) == list(range(200))


def test_drop_model_and_clear() -> None:
    cache = PromptCache(max_bytes=10**9)
    cache.insert("a", [1, 2], state_for(2))
    cache.insert("b", [1, 2], state_for(2))
    assert cache.drop_model("a") == 1
    assert set(cache.bytes_by_model()) == {"b"}
    assert cache.clear() == 1 and len(cache) == 0 and cache.nbytes == 0


def test_a_single_token_prompt_is_never_a_hit() -> None:
    cache = PromptCache(max_bytes=10**9)
    cache.insert("m", [5], state_for(1))
    assert cache.fetch("m", [5]).kind == "miss"


def test_a_pinned_entry_is_never_handed_out_evicted_or_replaced_until_it_expires() -> None:
    import math
    import time

    cache = PromptCache(max_bytes=10**9, max_entries=2)
    cache.insert("m", [1, 2, 3], state_for(3), pin_until=math.inf)
    # Fetched: the sequence gets a fork; the pin stays, whole.
    lookup = cache.fetch("m", [1, 2, 3, 9])
    assert lookup.kind == "shorter" and lookup.reused == 3
    assert cache.pinned("m", [1, 2, 3]) and cache_length(lookup.state) == 3
    extend(lookup.state, 3, 1, marker=100.0)  # the sequence writes on: the pin is untouched
    # A longer entry on its path does not replace it, as it would an unpinned prefix.
    cache.insert("m", [1, 2, 3, 9, 10], lookup.state)
    assert ("m", (1, 2, 3)) in cache.entries()
    # Eviction, by the entry cap or for the memory budget, passes it over.
    cache.insert("m", [7, 7, 7], state_for(3))
    cache.insert("m", [8, 8, 8], state_for(3))
    assert ("m", (1, 2, 3)) in cache.entries() and len(cache) == 2
    assert cache.evict_bytes(10**9) == 1
    assert cache.entries() == [("m", (1, 2, 3))]
    assert contents(cache.fetch("m", [1, 2, 3, 4]).state) == [0.0, 1.0, 2.0]
    # An expired pin is an ordinary entry again.
    cache.insert("m", [1, 2, 3], state_for(3), pin_until=time.time() - 1)
    assert not cache.pinned("m", [1, 2, 3])
    assert cache.evict_bytes(1) == 1 and len(cache) == 0


def test_room_is_made_from_background_work_entries_first() -> None:
    cache = PromptCache(max_bytes=10**9)
    cache.insert("m", [1, 0, 0, 0], state_for(4))  # an editor's: the least recently used
    cache.insert("m", [2, 0, 0, 0], state_for(4), background=True)
    cache.insert("m", [3, 0, 0, 0], state_for(4), background=True)
    one = cache.nbytes // 3
    assert cache.evict_bytes(one) == 1  # a background entry went, not the older editor's
    assert [k[1][0] for k in cache.entries()] == [1, 3]
    # Background work that shares takes no other entry, however much it needs.
    assert cache.evict_bytes(10**9, background_only=True) == 1
    assert [k[1][0] for k in cache.entries()] == [1]
    assert cache.evict_bytes(10**9) == 1 and len(cache) == 0
