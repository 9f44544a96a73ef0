"""Control requests: ``load``, ``unload``, ``list_models``, ``clear_cache`` and ``stats``,
each answered with its one reply in the round that reads it.

``unload`` first ends the model's running and waiting generates (``cancelled``), then
unloads it, which closes its generators and drops its prompt-cache entries (the worker's
``on_unload``). ``unload`` and ``clear_cache`` of a model the daemon does not know (not
resident, and no name it serves) are ``unknown_model``, as a ``load`` of it is: a typo must
not pass for a success. ``stats`` gathers the worker's counters, the cache's and the
budget's, and MLX's memory figures (``WorkerStats``); the loop adds its connection counters.

Threading: worker thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import structlog

from mlxd.protocol import (
    CacheStats,
    ClearCache,
    Done,
    GetStats,
    ListModels,
    Load,
    MemoryStats,
    Unload,
)

from .admission import Admission
from .cache import PromptCache
from .memory import MemoryBudget, give_back_buffers
from .models import LoadProgress, ModelRegistry
from .outbox import Event
from .sequences import Sequences

# One logger for all the worker thread does.
log = structlog.get_logger("mlxd.worker")

ControlRequest = Load | Unload | ListModels | ClearCache | GetStats


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """The worker's half of a ``stats`` reply; the loop adds the connection counters."""

    active_sequences: int
    queued: int
    decode_steps: int
    tokens_generated: int
    prompt_tokens_processed: int
    sequences_preempted: int
    tokens_drafted: int
    tokens_accepted: int
    models_resident: int
    memory_active_bytes: int
    memory_peak_bytes: int
    cache: CacheStats
    memory: MemoryStats


class Control:
    def __init__(
        self,
        models: ModelRegistry,
        cache: PromptCache,
        budget: MemoryBudget,
        sequences: Sequences,
        admission: Admission,
        progress: Callable[[Any, int], LoadProgress],
    ) -> None:
        self._models = models
        self._cache = cache
        self._budget = budget
        self._sequences = sequences
        self._admission = admission
        self._progress = progress

    def serve(self, req: ControlRequest, sink: Any, events: list[Event]) -> Done | WorkerStats:
        """Serve ``req``; returns its reply (what it ends goes to ``events``)."""
        if isinstance(req, Load):
            progress = self._progress(sink, req.id)
            loaded = self._models.get(req.model, req.keep_alive, progress)
            return Done(id=req.id, model=loaded.info())
        if isinstance(req, Unload):
            self._known(req.model)
            self._sequences.cancel_model(req.model, events)
            self._admission.cancel_model(req.model, events)
            self._models.unload(req.model)  # closes its batch (the worker's on_unload)
            return Done(id=req.id)
        if isinstance(req, ListModels):
            return Done(id=req.id, models=self._models.infos())
        if isinstance(req, ClearCache):
            if req.model is not None:
                self._known(req.model)
            dropped = self._cache.clear(req.model)
            give_back_buffers()  # the entries' memory goes back to the system, not MLX's pool
            log.info("cache_cleared", model=req.model, entries=dropped)
            return Done(id=req.id)
        return self._stats(req.reset_peak)

    def _known(self, name: str) -> None:
        """Raises ``unknown_model`` unless ``name`` is resident or is a name the daemon serves
        (a resident model whose name a reload took away is still known until unloaded)."""
        if all(m.name != name for m in self._models.resident()):
            self._models.resolve(name)

    def _stats(self, reset_peak: bool = False) -> WorkerStats:
        return WorkerStats(
            active_sequences=len(self._sequences.active),
            queued=len(self._admission.waiting),
            decode_steps=self._sequences.decode_steps,
            tokens_generated=self._sequences.tokens_generated,
            prompt_tokens_processed=self._sequences.prompt_tokens_processed,
            sequences_preempted=self._admission.preempted,
            tokens_drafted=self._sequences.tokens_drafted,
            tokens_accepted=self._sequences.tokens_accepted,
            models_resident=len(self._models.resident()),
            memory_active_bytes=mx.get_active_memory(),
            memory_peak_bytes=mx.get_peak_memory(),
            cache=self._cache_stats(),
            memory=self._budget.stats(reset_peak),
        )

    def _cache_stats(self) -> CacheStats:
        c = self._cache.counters
        return CacheStats(
            hits=dict(c.hits),
            tokens_reused=c.tokens_reused,
            tokens_processed=c.tokens_processed,
            entries=len(self._cache),
            bytes=self._cache.nbytes,
            max_bytes=self._cache.max_bytes,
            bytes_by_model=self._cache.bytes_by_model(),
            evictions=c.evictions,
            forks=c.forks,
        )
