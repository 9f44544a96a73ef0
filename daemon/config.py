"""The daemon's settings: one msgspec ``Struct``, built by ``settings.load`` from defaults,
the configuration file, ``MLXD_*`` and CLI flags.

Also the platform facts the settings default from (memory size, state folders).

Threading: a ``Config`` is immutable once built and read by every thread.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec

from mlxd.protocol import DEFAULT_MAX_FRAME_BYTES
from mlxd.protocol.paths import default_socket_path

from .model_options import ModelOptions

DEMO_MODEL_NAME = "demo"


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def default_memory_budget() -> int:
    # Leave the system and the user's other programs room: on a Mac the GPU shares this memory.
    return int(physical_memory_bytes() * 0.6)


def default_cache_budget() -> int:
    return int(physical_memory_bytes() * 0.15)


def default_state_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlxd"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mlxd"


def default_demo_model_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlxd" / "demo-model"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mlxd" / "demo-model"


class Config(msgspec.Struct, frozen=True, kw_only=True):
    socket_path: str = msgspec.field(default_factory=lambda: str(default_socket_path()))
    models: dict[str, str] = {}
    """Model name -> local mlx-lm model directory, or a Hugging Face repo id (``org/name``:
    no such path) found in huggingface_hub's cache (``daemon/hub.py``)."""
    model_options: dict[str, ModelOptions] = {}
    """Model name -> its options (``[model_options.NAME]``; daemon/model_options.py)."""
    models_dir: str | None = None
    """Folder whose sub-folders are models addressable by their folder name."""
    default_model: str | None = None
    memory_budget_bytes: int = msgspec.field(default_factory=default_memory_budget)
    """One budget for resident weights, running sequences' KV and the prompt cache's KV
    (see daemon/memory.py for what is freed, in which order, to stay under it)."""
    memory_headroom: float = 0.1
    """Fraction of the budget kept for what the accounting does not see (a sampler's
    temporaries, the allocator's rounding); prefill and step buffers are set aside per
    sequence."""
    keep_alive_s: float = 300.0
    """Idle seconds before a model is unloaded; -1 keeps models resident forever."""
    pinned_models: list[str] = []
    """Models kept resident once loaded: never unloaded by keep-alive or the budget."""
    background_aging_s: float = 30.0
    """A ``background`` request waiting this long is admitted as if ``interactive``."""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_tokens_limit: int = 32768
    """The largest ``max_tokens`` a request may ask for; more is ``invalid_request``."""
    max_prompt_tokens: int | None = None
    """Prompt tokens a request may have (``prompt_too_long`` past it); None: as many as the
    model's context takes."""
    max_batch_size: int = 32
    """Sequences of one model decoded together in one forward pass."""
    max_queued: int = 256
    """Requests waiting for a place in a batch; past this, new ones get ``overloaded``."""
    prefill_batch_size: int = 8
    prefill_step_size: int = 512
    """Prompt tokens prefilled per step: bounds how long one prompt holds up the others."""
    max_requests_per_connection: int = 64
    """Requests in flight on one connection; more get ``too_many_requests``."""
    max_connections: int = 256
    """Connections at once; one more gets ``overloaded`` and is closed, unless one of them
    has not said ``hello`` yet: the oldest such is closed to make room."""
    handshake_timeout_s: float = 5.0
    """Seconds a new connection has to send ``hello``; then it gets ``handshake_required``
    and is closed, so silent connections cannot hold the places others need."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM/SIGINT, seconds in-flight requests may take to finish before they are
    ended with ``shutting_down`` (launchd's own ExitTimeOut is 20 s)."""
    stall_timeout_s: float = 120.0
    """A worker round (a model load, one batch step) running longer than this is a stall:
    the daemon reports unhealthy, fails what is in flight and exits non-zero."""
    allow_root: bool = False
    distributed: bool = False
    """Serve one model across the ranks of ``mlx.launch``: rank 0 serves, the others follow
    its rounds (daemon/lockstep.py)."""
    """Also accept connections from root when the daemon runs as another user."""
    http: str | None = None
    """Where the OpenAI- and Ollama-compatible HTTP API listens: ``HOST:PORT`` or
    ``unix:PATH``; None (the default): no HTTP listener."""
    api_key_file: str | None = None
    """A file (mode 0600) holding the bearer key HTTP clients must present; required for a
    bind other than loopback."""
    cache_max_bytes: int = msgspec.field(default_factory=default_cache_budget)
    """Bytes of KV state the prompt cache may hold, across all models (within the memory
    budget, which may hold it to less); 0 disables it."""
    cache_max_entries: int = 256
    cache_kv_bits: int | None = None
    """Store prompt-cache entries quantized to this many bits (daemon/kv_quant.py); None:
    as the sequence left them."""
    cache_kv_group_size: int = 64
    cache_persist: bool = True
    """Write the prompt cache to ``state_dir`` on shutdown; restore it when a model loads."""
    cache_persist_max_bytes: int = 1024**3
    state_dir: str = msgspec.field(default_factory=lambda: str(default_state_dir()))
    demo_model_dir: str | None = None
    """Where the built-in demo model lives; built there on first use if missing."""
    blas: str = "auto"
    """Linux: ``auto`` preloads the system's optimized BLAS (OpenBLAS) when MLX links the
    reference one, ``system`` insists on it, ``bundled`` never preloads one (see
    daemon/blas.py). Decided once, at start."""
    log_level: str = "info"
    log_format: str = "auto"
    """``json``, ``console``, or ``auto``: console on a terminal, JSON otherwise."""

    def options(self, model: str) -> ModelOptions:
        return self.model_options.get(model) or ModelOptions()

    def default_model_name(self) -> str | None:
        return self.default_model or next(iter(self.models), None)

    def cache_dir(self) -> Path:
        return Path(self.state_dir).expanduser() / "prompt-cache"
