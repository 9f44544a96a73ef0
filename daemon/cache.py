"""The prompt cache: a model-namespaced LRU prefix trie of KV caches, owned by the worker.

A lookup for a prompt returns reusable KV state and the tokens still to process:

- ``exact``: a stored sequence equals the prompt; reuse all but its last token (which must
  be processed again, to have logits to sample from);
- ``shorter``: a stored sequence is a prefix of the prompt; reuse it, process the rest;
- ``longer``: a stored sequence shares a prefix with the prompt and goes beyond it; trim
  it back to the shared prefix, when its cache type can be trimmed;
- ``miss``: start empty, with a reason (nothing stored for the model, no shared prefix,
  the shared part too short, or only an untrimmable longer entry).

Pins. An entry can be pinned (``Warm`` with ``pin``), until a time or for good: eviction
(by the cache's own caps or by the memory budget, ``evict_bytes``) passes it over, a longer
entry does not replace it, it is never handed out (a sequence gets a fork of it) and it is
saved first. An expired pin makes it an ordinary entry again.

Ownership. A stored entry handed to a sequence is *taken out* of the trie, without a copy:
the sequence owns it, writes into its spare capacity in place, and gives it back (prompt +
generated tokens) when it ends, so the next turn or keystroke starts from it. No two live
sequences can write into one KV state. When a second sequence wants a prefix that a live
sequence holds, it gets a *fork*: slices of the live arrays, which MLX's copy-on-write
keeps independent (a buffer with two owners is copied before it is written, not shared).

Take or fork. An entry is taken (and trimmed) only when the sequence keeps most of it: at
least as many tokens as trimming would drop (``_worth_taking``). The next keystroke in a
file, or the same prompt again, drops only the generated tail and takes the entry. A
prompt that shares only a little of a longer entry (another file that starts with the
same token or two) gets a fork of that little and leaves the entry in the trie: switching
between files must not destroy their states. Its own state is stored beside the other
(it is no prefix of it, so it does not make it redundant) and LRU eviction decides which
goes. A fork's slices share the entry's buffers only until the sequence writes (it grows
its arrays, or its batch merges them, by copying); what it gives back is copied compact.

Built on mlx-lm: its ``PromptTrie`` (search, add, pop, pop of redundant prefixes), its
cache classes and ``trim_prompt_cache`` (saving and restoring: daemon/persist.py). Not
on its ``LRUPromptCache``, which deep-copies every entry it returns (doubling peak memory,
mlx-lm #1395), keeps no per-model byte counts, and has no notion of leased entries.

Threading: worker thread only. It holds MLX arrays and calls MLX; no locks, by design.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import structlog
from mlx.utils import tree_map
from mlx_lm.models.cache import (
    CacheList,
    KVCache,
    PromptTrie,
    QuantizedKVCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)

from . import clock, kv_quant

log = structlog.get_logger("mlxd.cache")

KVState = list[Any]
"""One model's per-layer cache objects (mlx-lm's ``KVCache`` and friends)."""

KINDS = ("exact", "shorter", "longer", "miss")


def cache_bytes(state: KVState) -> int:
    return sum(c.nbytes for c in state)


def cache_length(state: KVState) -> int:
    """Tokens the state holds (the first layer's offset: every layer holds the same)."""
    return int(getattr(state[0], "offset", 0)) if state else 0


def settle(state: KVState, tokens: list[int]) -> list[int] | None:
    """Make ``state`` hold exactly ``tokens`` (or their prefix, if it holds fewer), and
    hold them compactly; returns the tokens it holds, or None if it cannot be trimmed.

    Plain ``KVCache`` layers grow in 256-token steps: a 100-token chat turn sits in arrays
    of 256. Stored as it is, an entry would keep (and be billed for) that slack for as long
    as it is cached, so each layer is copied to its length, one layer at a time (the copy
    costs one layer's worth at once; the old arrays go with the sequence that grew them).

    A state taken out of a batch (``BatchGenerator.remove(..., return_prompt_caches=True)``:
    cancel, stop string, supersede, disconnect) is a lazy slice of the whole batch's
    arrays: left so, it keeps all of them alive while being billed for its own share. So
    every layer is also made to own exactly its bytes and evaluated: ``mx.contiguous``
    copies an array whose buffer holds more than its elements (a row slice included) and
    shares one that is already whole (checked in tests/test_cache.py), so a state that
    already owns its arrays (one ``_step_all`` evaluated, one compacted here) is not
    copied again.
    """
    length = cache_length(state)
    if length < len(tokens):
        tokens = tokens[:length]
    elif length > len(tokens):
        if not can_trim_prompt_cache(state):
            return None
        trim_prompt_cache(state, length - len(tokens))
    for c in state:
        if c.empty():
            continue
        if type(c) is KVCache and c.keys.shape[2] > c.offset:
            c.keys = mx.contiguous(c.keys[..., : c.offset, :])
            c.values = mx.contiguous(c.values[..., : c.offset, :])
        elif type(c) is QuantizedKVCache:
            kv_quant.compact(c)  # it grows in 256-token steps too
        else:
            _own(c)
        mx.eval(c.state)
    return tokens


def _own(layer: Any) -> None:
    if isinstance(layer, CacheList):  # its setter would rebuild the sub-caches
        for c in layer.caches:
            _own(c)
        return
    layer.state = tree_map(
        lambda x: mx.contiguous(x) if isinstance(x, mx.array) else x, layer.state
    )


def fork(state: KVState, length: int) -> KVState:
    """An independent copy of the first ``length`` tokens of ``state``, sharing memory.

    A ``KVCache`` is forked by slicing: the slice is a view until either side writes, and
    MLX copies a buffer that has two owners before it writes to it; a quantized one too
    (its packed arrays, scales and biases). Other cache types (rotating, recurrent) are
    deep-copied and trimmed.
    """
    out: KVState = []
    for c in state:
        if type(c) is KVCache:
            f = KVCache()
            if c.keys is not None:
                f.keys = c.keys[..., :length, :]
                f.values = c.values[..., :length, :]
                f.offset = length
            out.append(f)
        elif type(c) is QuantizedKVCache:
            out.append(kv_quant.fork_layer(c, length))
        else:
            out.append(copy.deepcopy(c))
    if any(type(c) is not KVCache for c in state):
        excess = cache_length(out) - length
        if excess > 0:
            trim_prompt_cache(out, excess)
    # Evaluate the views now, so they hold the current buffers rather than a graph.
    mx.eval([c.state for c in out if not c.empty()])
    return out


@dataclass(frozen=True, slots=True)
class Lookup:
    state: KVState | None
    reused: int
    """Prompt tokens covered by ``state``."""
    kind: str
    miss_reason: str | None = None


@dataclass(eq=False)
class _Entry:
    model: str
    tokens: tuple[int, ...]
    state: KVState
    nbytes: int
    pin_until: float = 0.0
    """Unix time the pin lasts until (``math.inf``: for good; 0: not pinned)."""
    background: bool = False
    """Stored by background work: the only entries background work may evict for room."""

    @property
    def pinned(self) -> bool:
        return self.pin_until > clock.wall()


@dataclass(eq=False)
class Lease:
    """A live sequence's state, open to forks while the sequence runs."""

    model: str
    prompt: list[int]
    state: KVState


@dataclass
class CacheCounters:
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    tokens_reused: int = 0
    tokens_processed: int = 0
    evictions: int = 0
    forks: int = 0
    not_cached_too_large: int = 0


class PromptCache:
    def __init__(
        self,
        max_bytes: int,
        max_entries: int = 256,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.kv_bits = kv_bits
        """Store entries quantized to this many bits (``cache.kv_bits``; daemon/kv_quant.py)."""
        self.kv_group_size = kv_group_size
        self.counters = CacheCounters()
        self._trie = PromptTrie()
        self._lru: OrderedDict[tuple[str, tuple[int, ...]], _Entry] = OrderedDict()
        self._bytes_by_model: dict[str, int] = {}
        self._leases: list[Lease] = []

    # ------------------------------------------------------------------ lookup

    def fetch(self, model: str, tokens: list[int]) -> Lookup:
        """Best reusable state for ``tokens``; the caller now owns it."""
        result = self._best(model, tokens)
        self.counters.hits[result.kind] += 1
        self.counters.tokens_reused += result.reused
        self.counters.tokens_processed += len(tokens) - result.reused
        return result

    def _best(self, model: str, tokens: list[int]) -> Lookup:
        if len(tokens) < 2:
            return Lookup(None, 0, "miss", "the prompt is a single token")
        found = self._trie.search(model, tokens)
        # At least one token is always processed: its logits give the first new token.
        usable = len(tokens) - 1
        if found.exact is not None:
            entry = self._lru[model, tuple(found.exact)]
            if can_trim_prompt_cache(entry.state):
                return Lookup(self._take(entry, usable), usable, "exact")
        # Candidates as (tokens reused, preference on ties, how to get the state).
        candidates: list[tuple[int, int, str, Any]] = []
        if found.shorter is not None:
            entry = self._lru[model, tuple(found.shorter)]
            candidates.append((len(found.shorter), 2, "shorter", entry))
        untrimmable_longer = False
        if found.longer is not None:
            entry = self._lru[model, tuple(found.longer)]
            if can_trim_prompt_cache(entry.state):
                candidates.append((min(usable, found.common_prefix), 1, "longer", entry))
            else:
                untrimmable_longer = True
        lease, n, kind = self._best_lease(model, tokens)
        if lease is not None:
            candidates.append((n, 0, kind, lease))
        if candidates:
            reused, _, kind, source = max(candidates, key=lambda c: (c[0], c[1]))
            if reused > 0:
                why = _partial_reason(kind, reused, len(tokens))
                if isinstance(source, Lease):
                    self.counters.forks += 1
                    return Lookup(fork(source.state, reused), reused, kind, why)
                return Lookup(self._take(source, reused), reused, kind, why)
        if untrimmable_longer:
            return Lookup(None, 0, "miss", "the only entry sharing a prefix cannot be trimmed")
        if not any(key[0] == model for key in self._lru) and not any(
            lease.model == model for lease in self._leases
        ):
            return Lookup(None, 0, "miss", "nothing is cached for this model")
        return Lookup(None, 0, "miss", "no cached prompt shares a prefix with this one")

    def _best_lease(self, model: str, tokens: list[int]) -> tuple[Lease | None, int, str]:
        """The live sequence whose computed state covers most of ``tokens``."""
        best: tuple[Lease | None, int, str] = (None, 0, "miss")
        for lease in self._leases:
            if lease.model != model:
                continue
            common = 0
            for a, b in zip(lease.prompt, tokens, strict=False):
                if a != b:
                    break
                common += 1
            n = min(common, len(tokens) - 1, cache_length(lease.state))
            if n > best[1]:
                if lease.prompt == tokens:
                    kind = "exact"
                elif common == len(lease.prompt):
                    kind = "shorter"
                else:
                    kind = "longer"
                best = (lease, n, kind)
        return best

    def _take(self, entry: _Entry, length: int) -> KVState:
        """Hand ``entry`` over, trimmed to ``length`` tokens: out of the trie, no copy; a
        pinned entry, or one of which too little is reused, stays, and the sequence gets a
        fork of it."""
        if entry.pinned:
            self._lru.move_to_end((entry.model, entry.tokens))
            self.counters.forks += 1
            return fork(entry.state, length)
        if not _worth_taking(entry, length):
            # Not a use of the entry's own content: its place in the LRU order stays.
            self.counters.forks += 1
            return fork(entry.state, length)
        self._remove(entry)
        excess = cache_length(entry.state) - length
        if excess > 0:
            trim_prompt_cache(entry.state, excess)
        return entry.state

    # ------------------------------------------------------------------ leases

    def lease(self, model: str, prompt: list[int], state: KVState) -> Lease:
        lease = Lease(model, prompt, state)
        self._leases.append(lease)
        return lease

    def release(self, lease: Lease) -> None:
        if lease in self._leases:
            self._leases.remove(lease)

    # ------------------------------------------------------------------ storing

    def insert(
        self,
        model: str,
        tokens: list[int],
        state: KVState,
        pin_until: float | None = None,
        background: bool = False,
    ) -> bool:
        """Store ``state`` for ``tokens`` (the state may hold more: it is trimmed to fit, see
        ``settle``). ``pin_until`` pins it (see ``_Entry``); None keeps the pin of an entry
        it replaces.

        Returns False when it was not stored (alone over the byte budget, or empty).
        """
        settled = self.settle(state, tokens)
        if settled is None:
            return False
        tokens = settled
        if not tokens:
            return False
        nbytes = cache_bytes(state)
        if nbytes > self.max_bytes:
            self.counters.not_cached_too_large += 1
            return False
        key = (model, tuple(tokens))
        old = self._lru.get(key)
        if old is not None:
            pin_until = old.pin_until if pin_until is None else pin_until
            self._remove(old)
        entry = _Entry(model, key[1], state, nbytes, pin_until or 0.0, background)
        self._trie.add(model, tokens, entry)
        self._lru[key] = entry
        self._bytes_by_model[model] = self._bytes_by_model.get(model, 0) + nbytes
        if can_trim_prompt_cache(state):
            # Shorter entries on this path are now redundant: this one can be trimmed to them.
            # A pinned one stays: the longer entry may be handed out, the pin never is.
            for n, prefix in self._trie.pop_prefixes(model, tokens):
                if prefix.pinned:
                    self._trie.add(model, tokens[:n], prefix)
                else:
                    self._forget(self._lru.pop((model, tuple(tokens[:n]))))
        self._evict()
        return key in self._lru

    def settle(self, state: KVState, tokens: list[int]) -> list[int] | None:
        """``settle``, then the state in the form it is stored in: quantized, layer by
        layer, when ``kv_bits`` is set (an entry already quantized stays as it is). Its
        ``cache_bytes`` after this are what it is charged."""
        settled = settle(state, tokens)
        if settled and self.kv_bits is not None:
            kv_quant.quantize(state, self.kv_bits, self.kv_group_size)
        return settled

    def _evict(self) -> None:
        """Keep within the cache's own caps, least recently used first, pins passed over."""
        for key, entry in list(self._lru.items()):
            if len(self._lru) <= self.max_entries and self.nbytes <= self.max_bytes:
                return
            if not entry.pinned or key == next(reversed(self._lru)):
                # The newest entry goes too if pins alone fill the cache: never the pins.
                self._evict_one(entry)

    def evict_bytes(self, needed: int, background_only: bool = False) -> int:
        """Evict unpinned entries until ``needed`` bytes are freed or none is left:
        background work's first, then (unless ``background_only``) the others, each least
        recently used first. Returns how many went (for the memory budget)."""
        unpinned = [e for e in self._lru.values() if not e.pinned]
        order = [e for e in unpinned if e.background]
        if not background_only:
            order += [e for e in unpinned if not e.background]
        freed = count = 0
        for entry in order:
            if freed >= needed:
                break
            freed += entry.nbytes
            count += 1
            self._evict_one(entry)
        return count

    def _evict_one(self, entry: _Entry) -> None:
        self._remove(entry)
        self.counters.evictions += 1
        log.info("cache_evicted", model=entry.model, tokens=len(entry.tokens), bytes=entry.nbytes)

    def set_limits(
        self, max_bytes: int, max_entries: int, kv_bits: int | None = None, kv_group_size: int = 64
    ) -> None:
        """New budgets (a configuration reload); evicts at once down to them. A new
        ``kv_bits`` applies to entries stored from now on."""
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self._evict()

    def _remove(self, entry: _Entry) -> None:
        self._trie.pop(entry.model, list(entry.tokens))
        del self._lru[entry.model, entry.tokens]
        self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        left = self._bytes_by_model.get(entry.model, 0) - entry.nbytes
        if left > 0:
            self._bytes_by_model[entry.model] = left
        else:
            self._bytes_by_model.pop(entry.model, None)

    def drop_model(self, model: str) -> int:
        """Forget every entry of ``model`` (unloaded, or cleared); returns how many."""
        victims = [e for (m, _), e in self._lru.items() if m == model]
        for entry in victims:
            self._remove(entry)
        return len(victims)

    def clear(self, model: str | None = None) -> int:
        if model is not None:
            return self.drop_model(model)
        return sum(self.drop_model(m) for m in {m for m, _ in self._lru})

    # ------------------------------------------------------------------ reporting

    @property
    def nbytes(self) -> int:
        return sum(self._bytes_by_model.values())

    def pinned_bytes(self) -> int:
        return sum(e.nbytes for e in self._lru.values() if e.pinned)

    def pinned(self, model: str, tokens: list[int]) -> bool:
        entry = self._lru.get((model, tuple(tokens)))
        return entry is not None and entry.pinned

    def __len__(self) -> int:
        return len(self._lru)

    def bytes_by_model(self) -> dict[str, int]:
        return dict(self._bytes_by_model)

    def entries(self, model: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """Keys, least recently used first."""
        return [k for k in self._lru if model is None or k[0] == model]

    def stored(self) -> list[_Entry]:
        """The stored entries, most recently used first (for daemon/persist.py)."""
        return list(reversed(self._lru.values()))


def _worth_taking(entry: _Entry, length: int) -> bool:
    """Whether reusing ``length`` tokens of ``entry`` may consume it: trimming would drop
    no more than it keeps (see the module's docstring, "Take or fork")."""
    return len(entry.tokens) - length <= length


def _partial_reason(kind: str, reused: int, prompt: int) -> str | None:
    """Why a hit that is not whole left tokens to process (issue: "say why it missed")."""
    if reused >= prompt - 1:
        return None  # the whole prompt but the token that is always processed: no miss
    if kind == "longer":
        return f"a cached sequence diverges from this prompt after token {reused}"
    if kind == "shorter":
        return f"nothing cached extends past token {reused} of this prompt"
    return None
