"""The records a ``done`` reports: a generate's usage, timings and cache use, the models,
the daemon's health and its stats (prompt cache, memory budget, counters).

Plain msgspec ``Struct``\\s, not messages (no ``type`` tag): protocol/messages.py's ``Done``
carries them. Re-exported whole by ``mlxd.protocol``.

Threading: pure data; safe from any thread.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


class Timings(Struct, kw_only=True):
    queue_s: float
    """From the server receiving the request to the worker starting it."""
    ttft_s: float
    """From the server receiving the request to the first generated token (a ``warm``: to
    the end of its prefill)."""
    total_s: float
    tokens_per_s: float
    """Decode rate: completion tokens after the first, per second after the first (0 with
    fewer than two, and for a ``warm``, which decodes nothing)."""


class CacheUse(Struct, kw_only=True, omit_defaults=True):
    """How a generate used the prompt cache."""

    kind: Literal["exact", "shorter", "longer", "miss", "bypass"]
    """exact: the whole prompt was cached; shorter: a cached prompt was a prefix of it;
    longer: a longer cached sequence was trimmed back to the shared prefix; miss: nothing
    reusable (see ``miss_reason``); bypass: the request asked not to use the cache."""
    miss_reason: str | None = None


class CacheStats(Struct, kw_only=True):
    hits: dict[str, int]
    """Lookups by kind: exact, shorter, longer, miss."""
    tokens_reused: int
    tokens_processed: int
    entries: int
    bytes: int
    max_bytes: int
    bytes_by_model: dict[str, int]
    evictions: int
    forks: int
    """Lookups served by forking a live sequence's state (copy-on-write)."""


class MemorySplit(Struct, kw_only=True):
    """One model's share of the memory budget, in bytes."""

    weights: int
    live_kv: int
    """Set aside for its running sequences' KV: prompt plus max_tokens each, as the KV
    arrays lay it out (a batch pads each sequence to its longest)."""
    cached_kv: int
    scratch: int = 0
    """Set aside for its running sequences' transient buffers (prefill activations and
    attention scores, a step's copies)."""


class MemoryStats(Struct, kw_only=True):
    """The one budget that weights, live KV and cached KV share, by the daemon's accounting,
    and what MLX itself reports (which also counts temporaries of the step in progress)."""

    budget_bytes: int
    usable_bytes: int
    """The budget less a headroom for what the accounting does not see: what the
    accounted total (``used_bytes``) is held under."""
    used_bytes: int
    peak_used_bytes: int
    weights_bytes: int
    live_kv_bytes: int
    cached_kv_bytes: int
    pinned_kv_bytes: int
    by_model: dict[str, MemorySplit]
    scratch_bytes: int = 0
    """Set aside for MLX's transient buffers of the running sequences (in ``used_bytes``)."""
    mlx_active_bytes: int
    mlx_peak_bytes: int
    """Since the daemon started, or since the last ``stats`` with ``reset_peak``."""
    evicted_entries: int
    """Prompt-cache entries dropped to make room under the budget (not by the cache's cap)."""
    unloaded_models: int
    """Models unloaded to make room under the budget."""
    mlx_cache_bytes: int = 0
    """MLX's buffer cache: freed arrays' memory MLX keeps for reuse (not in
    ``mlx_active_bytes``), bounded by the budget's headroom and given back when idle."""


class ModelInfo(Struct, kw_only=True, omit_defaults=True):
    name: str
    path: str
    resident: bool
    bytes: int = 0
    """Bytes of weights in memory (0 when not resident)."""
    last_used: float | None = None
    """Unix time of the last request that used it."""
    keep_alive_s: float | None = None
    """Seconds of idleness after which it is unloaded; -1 never (pinned resident)."""
    active_sequences: int = 0
    pinned: bool = False
    """Never unloaded: by keep-alive, nor to make room under the memory budget."""


class Health(Struct, kw_only=True):
    status: Literal["ok", "draining", "stalled", "dead"] = "ok"
    """``ok`` serves; ``draining`` is shutting down; ``stalled`` and ``dead`` are about to exit
    non-zero (the worker is stuck in one round past the stall timeout, or gone)."""
    worker_alive: bool
    worker_busy_s: float
    """Seconds the worker has been inside its current round (loading a model, a long step)."""
    queued: int
    active_sequences: int
    models_resident: list[str]
    uptime_s: float


class SpeculativeUse(Struct, kw_only=True):
    """What speculative decoding did for one generate: its mode, the tokens proposed and
    the tokens of those the model accepted."""

    mode: str
    drafted: int
    accepted: int


class ServerStats(Struct, kw_only=True):
    uptime_s: float
    connections: int
    requests_in_flight: int
    requests_total: int
    requests_completed: int
    requests_cancelled: int
    requests_failed: int
    active_sequences: int
    queued: int
    tokens_generated: int
    decode_steps: int
    """Batched forward passes of decoding; tokens_generated / decode_steps is the mean batch."""
    prompt_tokens_processed: int
    models_resident: int
    memory_active_bytes: int
    memory_peak_bytes: int
    worker_alive: bool
    cache: CacheStats | None = None
    memory: MemoryStats | None = None
    sequences_preempted: int = 0
    """Times a running sequence left its batch, state kept, because its connection's
    replies piled up unread; it resumed where it was once they were read."""
    tokens_drafted: int = 0
    """Tokens speculative decoding proposed, in every finished generate so far."""
    tokens_accepted: int = 0
    """Of those, the tokens the model accepted (generated without a pass of their own)."""


__all__ = [
    "CacheStats",
    "CacheUse",
    "Health",
    "MemorySplit",
    "MemoryStats",
    "ModelInfo",
    "ServerStats",
    "SpeculativeUse",
    "Timings",
    "Usage",
]
