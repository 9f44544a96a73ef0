"""One memory budget for the weights of every resident model, the KV state of running
sequences and the prompt cache's KV state, and the policy that keeps them under it.

Accounting, not guessing: weights are the loaded arrays' bytes, cached KV is the cache's
own byte count (allocated capacity, not just the tokens held), and a running sequence is
charged, from its admission, for the KV of its prompt plus ``max_tokens`` (capped at the
model's context), so it can never grow past what was set aside for it. MLX's own figures
(``mx.get_active_memory``/``get_peak_memory``) are reported next to the accounting: they
also count the temporaries of the step in progress.

The accounting does not see MLX's transient buffers (a step's activations, a prefill
chunk's attention scores), so it keeps to ``limit`` less a headroom (``memory_headroom``,
10% by default): MLX's measured peak then stays under the budget itself.

When something new needs room (a model to load, a sequence to admit, an entry to cache)
the policy frees, in this order and only as much as needed: prompt-cache entries, least
recently used first (never a pinned one); then idle models, least recently used first
(never a pinned model, never one with a running or waiting sequence). What still does not
fit is refused with ``insufficient_memory`` (or, for a sequence, waits while others run),
never a crash. One budget, enforced on every path that allocates (mlx-lm #1118, #1392, #1807).

On Apple silicon the budget also becomes MLX's wired limit, so the weights and KV stay
resident in unified memory.

Threading: worker thread only (it reads and changes the worker's models and cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import structlog

from mlxd.protocol import MemorySplit, MemoryStats

from .cache import PromptCache
from .models import LoadedModel, ModelRegistry

log = structlog.get_logger("mlxd.memory")


@dataclass
class MemoryBudget:
    limit: int
    headroom: float
    cache: PromptCache
    models: ModelRegistry
    live_kv: Callable[[], dict[str, int]]
    """Bytes reserved by running sequences, by model name."""
    peak_used: int = 0
    evicted_entries: int = 0
    unloaded_models: int = 0

    def apply_platform_limits(self) -> None:
        """On Metal, wire up to the budget (as mlx-lm's ``wired_limit`` does for one
        generation), so macOS does not page the model out between requests."""
        metal = getattr(mx, "metal", None)
        if metal is not None and metal.is_available():
            recommended = metal.device_info().get("max_recommended_working_set_size", self.limit)
            mx.set_wired_limit(min(self.limit, int(recommended)))

    # ------------------------------------------------------------------ accounting

    def used(self) -> int:
        weights = self.models.resident_bytes()
        return weights + sum(self.live_kv().values()) + self.cache.nbytes

    def note(self) -> None:
        self.peak_used = max(self.peak_used, self.used())

    @property
    def usable(self) -> int:
        """What the accounting may fill: the limit less the transient buffers' headroom."""
        return int(self.limit * (1.0 - self.headroom))

    def fits(self, needed: int) -> bool:
        return self.used() + needed <= self.usable

    # ------------------------------------------------------------------ the policy

    def make_room(
        self, needed: int, *, keep: LoadedModel | None = None, unload_models: bool = True
    ) -> bool:
        """Free what the policy allows until ``needed`` more bytes fit; True if they do.

        ``keep`` is the model the room is for (never unloaded for itself). With
        ``unload_models`` false only cache entries go (making room for a cache entry must
        not cost a model its residency)."""
        if self.fits(needed):
            return True
        over = self.used() + needed - self.usable
        freed = self.cache.evict_bytes(over)
        if freed:
            self.evicted_entries += freed
            log.info("budget_evicted_entries", entries=freed, needed=needed)
        if self.fits(needed) or not unload_models:
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
        live = self.live_kv()
        cached = self.cache.bytes_by_model()
        weights = {m.name: m.nbytes for m in self.models.resident()}
        names = sorted(set(live) | set(cached) | set(weights))
        stats = MemoryStats(
            budget_bytes=self.limit,
            usable_bytes=self.usable,
            used_bytes=self.used(),
            peak_used_bytes=max(self.peak_used, self.used()),
            weights_bytes=sum(weights.values()),
            live_kv_bytes=sum(live.values()),
            cached_kv_bytes=self.cache.nbytes,
            pinned_kv_bytes=self.cache.pinned_bytes(),
            by_model={
                n: MemorySplit(
                    weights=weights.get(n, 0), live_kv=live.get(n, 0), cached_kv=cached.get(n, 0)
                )
                for n in names
            },
            mlx_active_bytes=mx.get_active_memory(),
            mlx_peak_bytes=mx.get_peak_memory(),
            evicted_entries=self.evicted_entries,
            unloaded_models=self.unloaded_models,
        )
        if reset_peak:
            self.peak_used = self.used()
            mx.reset_peak_memory()
        return stats
