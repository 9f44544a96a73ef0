"""One memory budget for the weights of every resident model, the KV state of running
sequences and the prompt cache's KV state, and the policy that keeps them under it.

Accounting, not guessing: weights are the loaded arrays' bytes and cached KV is the cache's
own byte count (allocated capacity, not just the tokens held). A running sequence is
charged, from its admission, for what its generator may allocate for it:

- KV: its span (prompt plus ``max_tokens``, at most the context) as mlx-lm's cache classes
  lay it out. They grow in ``KV_STEP``-token steps, and a batch pads every sequence to the
  longest, so a batch costs ``sequences x (longest span + KV_STEP)`` tokens;
- scratch, MLX's transient buffers: while its prompt is prefilled, a chunk's activations
  and attention scores (a prefill group pays for its largest member), and a step's copy of
  one layer's KV as the arrays grow; measured per model at load
  (``LoadedModel.scratch_bytes``), not guessed.

MLX's own figures (``mx.get_active_memory``/``get_peak_memory``) are reported next to the
accounting. The accounting keeps to ``limit`` less a small headroom
(``memory_headroom``, 10% by default) for what it still does not see (the sampler's
temporaries, the allocator's rounding), so MLX's measured peak stays under the budget.

When something new needs room (a model to load, a sequence to admit, an entry to cache)
the policy frees, in this order and only as much as needed: prompt-cache entries stored
by background work, then the others, least recently used first (never a pinned one); then
idle models, least recently used first (never a pinned model, never one with a running or
waiting sequence). Background work that has to share takes only background work's own
entries, and no model: it waits for room instead (see ``make_room``). What still does not
fit is refused with ``insufficient_memory`` (or, for a sequence, waits while others run),
never a crash. One budget, enforced on every path that allocates (mlx-lm #1118, #1392, #1807).

On Apple silicon the budget also becomes MLX's wired limit, so the weights and KV stay
resident in unified memory.

MLX's buffer cache (the memory of freed arrays, kept for reuse) is outside the accounting:
left alone it grows to MLX's memory limit and the process's RSS never comes back. It is
bounded by the headroom (``mx.set_cache_limit``), which exists for what the accounting
does not see, and the worker empties it when it goes idle (``Worker._take_commands``).

Threading: worker thread only (it reads and changes the worker's models and cache).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import structlog

from mlxd.protocol import MemorySplit, MemoryStats

from .cache import PromptCache
from .models import LoadedModel, ModelRegistry

log = structlog.get_logger("mlxd.memory")

KV_STEP = 256
"""mlx-lm's ``KVCache`` and ``BatchKVCache`` grow their arrays by this many tokens."""


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):  # not glibc (musl has neither)
        return None
    return libc


_GLIBC = _glibc()
_M_MMAP_THRESHOLD = -3


def give_back_buffers() -> None:
    """Empty MLX's buffer cache and return the memory to the system. On MLX's CPU backend
    the buffers are malloc'd, and glibc keeps freed memory in its arenas: trim them too."""
    mx.clear_cache()
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


def _fix_mmap_threshold() -> None:
    """Buffers of 128 KiB and more mapped and unmapped whole, so their memory leaves with
    them: glibc's default raises its mmap threshold past every such block freed, and later
    blocks of that size then come from (and fragment) the heap, which no trim gives back."""
    if _GLIBC is not None:
        _GLIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


@dataclass(frozen=True, slots=True)
class Footprint:
    """What a sequence asks of memory, in tokens."""

    span: int
    """Tokens of KV it may hold: prompt plus ``max_tokens``, at most the context."""
    prefill: int
    """Tokens its prefill processes per step; 0 once it has its first token."""
    context: int
    """Its prompt's length: what the last prefill chunk attends to."""
    held: int = 0
    """Bytes of a cached state it took, held until its prefill copies it into the batch."""


def generator_bytes(
    model: LoadedModel,
    sequences: list[Footprint],
    prefill_batch: int,
    batched: bool = True,
    quantized_per_token: int | None = None,
) -> tuple[int, int]:
    """(KV, scratch) bytes that one generator running ``sequences`` of ``model`` may hold
    at once: its padded KV arrays, and the largest transient of a step.
    ``quantized_per_token``: a lone sequence's KV is quantized (the model's ``kv_bits``,
    daemon/kv_quant.py), at this many bytes a token."""
    if not sequences:
        return 0, 0
    longest = max(s.span for s in sequences) + KV_STEP
    per_token = quantized_per_token or model.kv_bytes_per_token
    kv = len(sequences) * longest * per_token
    # Growing a cache concatenates one layer's arrays at a time: the old and the new copy
    # of that layer live together for a moment. A batch also copies its arrays when
    # sequences leave it (and merges prefilled groups in): measured on MLX's CPU backend,
    # up to half of them at once.
    scratch = kv // 2 if batched else kv // model.num_layers
    scratch += sum(model.scratch_bytes(1, s.span) for s in sequences)  # a decode step
    prefilling = [s for s in sequences if s.prefill]
    if prefilling:
        # mlx-lm prefills up to prefill_batch prompts as one group, padded to the longest.
        group = min(len(prefilling), prefill_batch)
        chunk = max(s.prefill for s in prefilling)
        context = max(s.context for s in prefilling)
        scratch += group * model.scratch_bytes(chunk, context)
        scratch += sum(s.held for s in prefilling)
        if quantized_per_token:
            # mlx-lm quantizes after the first prefill chunk: that chunk's plain KV first.
            scratch += (chunk + KV_STEP) * model.kv_bytes_per_token
    return kv, scratch


@dataclass
class MemoryBudget:
    limit: int
    headroom: float
    cache: PromptCache
    models: ModelRegistry
    live: Callable[[], dict[str, tuple[int, int]]]
    """(KV, scratch) bytes set aside for running sequences, by model name."""
    peak_used: int = 0
    evicted_entries: int = 0
    unloaded_models: int = 0

    def apply_platform_limits(self) -> None:
        """Bound MLX's buffer cache by the headroom; on Metal, wire up to the budget (as
        mlx-lm's ``wired_limit`` does for one generation), so macOS does not page the model
        out between requests."""
        self.bound_buffer_cache()
        _fix_mmap_threshold()
        metal = getattr(mx, "metal", None)
        if metal is not None and metal.is_available():
            recommended = metal.device_info().get("max_recommended_working_set_size", self.limit)
            mx.set_wired_limit(min(self.limit, int(recommended)))

    def bound_buffer_cache(self) -> None:
        mx.set_cache_limit(max(0, self.limit - self.usable))

    # ------------------------------------------------------------------ accounting

    def used(self) -> int:
        weights = self.models.resident_bytes()
        live = sum(kv + scratch for kv, scratch in self.live().values())
        return weights + live + self.cache.nbytes

    def note(self) -> None:
        self.peak_used = max(self.peak_used, self.used())

    @property
    def usable(self) -> int:
        """What the accounting may fill: the limit less the headroom."""
        return int(self.limit * (1.0 - self.headroom))

    def fits(self, needed: int) -> bool:
        return self.used() + needed <= self.usable

    # ------------------------------------------------------------------ the policy

    def make_room(
        self,
        needed: int,
        *,
        keep: LoadedModel | None = None,
        unload_models: bool = True,
        for_background: bool = False,
    ) -> bool:
        """Free what the policy allows until ``needed`` more bytes fit; True if they do.

        ``keep`` is the model the room is for (never unloaded for itself). With
        ``unload_models`` false only cache entries go (making room for a cache entry must
        not cost a model its residency). ``for_background``: room for background work (a
        sequence while others run, or its state going into the cache), which takes only
        background work's own cache entries: never the cached state an editor or a chat
        comes back to, nor a model."""
        if self.fits(needed):
            return True
        over = self.used() + needed - self.usable
        freed = self.cache.evict_bytes(over, background_only=for_background)
        if freed:
            self.evicted_entries += freed
            log.info("budget_evicted_entries", entries=freed, needed=needed)
        if self.fits(needed) or not unload_models or for_background:
            return self.fits(needed)
        for victim in self.models.resident():  # least recently used first
            if self.fits(needed):
                break
            if victim is keep or victim.active or victim.pinned:
                continue
            log.info("budget_unloaded_model", model=victim.name, bytes=victim.nbytes)
            self.models.unload(victim.name, reason="memory_budget")
            self.unloaded_models += 1
        return self.fits(needed)

    # ------------------------------------------------------------------ reporting

    def stats(self, reset_peak: bool = False) -> MemoryStats:
        live = self.live()
        cached = self.cache.bytes_by_model()
        weights = {m.name: m.nbytes for m in self.models.resident()}
        names = sorted(set(live) | set(cached) | set(weights))
        stats = MemoryStats(
            budget_bytes=self.limit,
            usable_bytes=self.usable,
            used_bytes=self.used(),
            peak_used_bytes=max(self.peak_used, self.used()),
            weights_bytes=sum(weights.values()),
            live_kv_bytes=sum(kv for kv, _ in live.values()),
            scratch_bytes=sum(scratch for _, scratch in live.values()),
            cached_kv_bytes=self.cache.nbytes,
            pinned_kv_bytes=self.cache.pinned_bytes(),
            by_model={
                n: MemorySplit(
                    weights=weights.get(n, 0),
                    live_kv=live.get(n, (0, 0))[0],
                    scratch=live.get(n, (0, 0))[1],
                    cached_kv=cached.get(n, 0),
                )
                for n in names
            },
            mlx_active_bytes=mx.get_active_memory(),
            mlx_peak_bytes=max(mx.get_peak_memory(), self.models.mlx_peak_floor),
            mlx_cache_bytes=mx.get_cache_memory(),
            evicted_entries=self.evicted_entries,
            unloaded_models=self.unloaded_models,
        )
        if reset_peak:
            self.peak_used = self.used()
            mx.reset_peak_memory()
            self.models.mlx_peak_floor = 0
        return stats
