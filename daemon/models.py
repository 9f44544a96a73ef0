"""Resident models: name resolution, loading, LRU unloading under a byte budget, keep-alive.

A model name resolves to a local mlx-lm model directory: a configured alias first (a path,
or a repo id's snapshot in the Hugging Face cache: daemon/hub.py), then a sub-folder of
``models_dir`` (never a path that leaves it). Models load on first use or by an explicit
``load``; room for its weights is made by the worker's ``MemoryBudget`` (which
may unload least recently used idle models); a model idle past its keep-alive is unloaded
by ``sweep``. A model with keep-alive -1 (per request, or named in ``pinned_models``) is
pinned: never unloaded by either.

Loading reports progress: the weights are loaded lazily, then read into memory in about
``LOAD_STEPS`` groups of similar size, and ``on_progress(model, done_bytes, total_bytes)``
is called before the first group and after each one (the worker turns that into protocol
``progress`` messages, and into a sign of life for the stall watchdog).

Threading: worker thread only. Loading creates MLX arrays, and MLX streams are
thread-local (mlx-lm #1181), so a model must be loaded on the thread that runs it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec
import structlog
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import sharded_load

from mlxd.protocol import ModelInfo, errors

from . import clock, hub, weights
from .config import Config
from .model_options import NUM_DRAFT_TOKENS
from .prompts import max_token_bytes
from .weights import LOAD_STEPS  # noqa: F401  (how progress is reported: tests read it)

log = structlog.get_logger("mlxd.models")


LoadProgress = Callable[[str, int, int], None]
"""``(model, done_bytes, total_bytes)``: bytes of weights in memory so far, of the total."""


class RequestError(Exception):
    """A request cannot be served; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ModelError(RequestError):
    """A request cannot be served because of its model."""


@dataclass(eq=False)
class LoadedModel:
    name: str
    path: Path
    model: Any
    tokenizer: TokenizerWrapper
    nbytes: int
    identity: str
    """A fingerprint of the weights: saved prompt caches are reused only for the same."""
    vocab_size: int
    context_length: int | None
    keep_alive_s: float
    kv_bytes_per_token: int = 0
    """KV-cache bytes one more token of context costs (measured at load)."""
    scratch: tuple[float, float] = (0.0, 0.0)
    """MLX's transient bytes in a forward pass, per token processed and per (token, context
    token) pair (measured at load; see ``weights.scratch_per_token``)."""
    num_layers: int = 1
    max_token_bytes: int | None = None
    """The most bytes of text one token stands for (``prompts.max_token_bytes``): a text
    of B bytes is at least B / this many tokens. None: no such bound for this tokenizer."""
    pinned_by_config: bool = False
    last_used: float = field(default_factory=clock.wall)
    active: int = 0
    """Sequences running on it now; a model with any is never unloaded."""
    speculative: str | None = None
    """Its configured speculative mode (``Generate.speculative`` when a request gives none)."""
    draft: Any = None
    """Its draft model (an mlx-lm model), loaded with it, for ``speculative`` ``draft``."""
    num_draft_tokens: int = NUM_DRAFT_TOKENS

    @property
    def pinned(self) -> bool:
        return self.keep_alive_s < 0

    def scratch_bytes(self, tokens: int, context: int) -> int:
        """Transient bytes of one forward pass over ``tokens`` tokens that attend to
        ``context`` tokens (activations, attention scores), beyond the KV it writes."""
        per_token, per_pair = self.scratch
        return math.ceil(tokens * (per_token + per_pair * context))

    def touch(self, keep_alive_s: float | None) -> None:
        self.last_used = clock.wall()
        if keep_alive_s is not None and not self.pinned_by_config:
            self.keep_alive_s = keep_alive_s

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            path=str(self.path),
            resident=True,
            bytes=self.nbytes,
            last_used=self.last_used,
            keep_alive_s=self.keep_alive_s,
            active_sequences=self.active,
            pinned=self.pinned,
        )


class ModelRegistry:
    def __init__(
        self,
        config: Config,
        on_load: Callable[[LoadedModel], None] | None = None,
        on_unload: Callable[[LoadedModel], None] | None = None,
        make_room: Callable[[int], bool] | None = None,
        agree: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self._config = config
        self._agree = agree
        """Distributed mode: rank 0's value of what each rank measures for itself."""
        self._on_load = on_load
        self._on_unload = on_unload
        self._make_room = make_room or self._unload_idle_for
        self._aliases = dict(config.models)  # name -> source: a path or a repo id
        self._models_dir = Path(config.models_dir).expanduser() if config.models_dir else None
        self._resident: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self.mlx_peak_floor = 0
        """MLX's peak before a load's probe reset it: the true peak is the larger."""
        # Resident models whose name now resolves elsewhere (a reload) but that were busy:
        # requests for the name still get them until they are idle and unloaded.
        self._stale: set[str] = set()

    def reconfigure(self, config: Config) -> None:
        """New aliases, models folder, budget and default keep-alive (a SIGHUP reload)."""
        self._config = config
        self._aliases = dict(config.models)
        self._models_dir = Path(config.models_dir).expanduser() if config.models_dir else None
        for m in list(self._resident.values()):
            try:
                same = self.resolve(m.name) == m.path
            except ModelError:
                same = False
            if not same:
                self._stale.add(m.name)
        self._unload_stale()

    def _unload_stale(self) -> None:
        for name in [n for n in self._stale if n not in self._resident]:
            self._stale.discard(name)
        for name in list(self._stale):
            if self._resident[name].active == 0:
                self._stale.discard(name)
                self.unload(name, reason="reconfigured")

    def resolve(self, name: str) -> Path:
        if name in self._aliases:
            try:
                return hub.source_dir(self._aliases[name])
            except hub.HubError as exc:  # a repo removed from the cache since the start
                raise ModelError(errors.MODEL_LOAD_FAILED, exc.message) from None
        folder = hub.folder_in(self._models_dir, name) if self._models_dir is not None else None
        if folder is not None:
            return folder
        raise ModelError(errors.UNKNOWN_MODEL, f"unknown model {name!r}")

    def get(
        self,
        name: str | None,
        keep_alive_s: float | None = None,
        on_progress: LoadProgress | None = None,
    ) -> LoadedModel:
        """The resident model called ``name`` (the default when None), loading it if needed;
        ``on_progress`` hears how the load goes (nothing when it is resident already)."""
        name = name or self._config.default_model_name()
        if name is None:
            raise ModelError(errors.UNKNOWN_MODEL, "no model given and no default model set")
        if self._stale:
            self._unload_stale()
        loaded = self._resident.get(name)
        if loaded is None:
            loaded = self._load(name, self.resolve(name), on_progress)
        self._resident.move_to_end(name)
        loaded.touch(keep_alive_s)
        return loaded

    def _load(self, name: str, path: Path, on_progress: LoadProgress | None = None) -> LoadedModel:
        demo = self._config.demo_model_dir
        if demo is not None and path == Path(demo).expanduser():
            from .demo_model import ensure_demo_model

            ensure_demo_model(path)
        if not (path / "config.json").is_file():
            raise ModelError(errors.MODEL_LOAD_FAILED, f"{path} is not an mlx-lm model directory")
        budget = self._config.memory_budget_bytes
        needed = weights.weights_on_disk(path)
        options = self._config.options(name)
        if options.draft is not None:
            with contextlib.suppress(ModelError):  # an unknown draft fails its load below
                needed += weights.weights_on_disk(self.resolve(options.draft))  # loaded with it
        if needed > budget:
            raise ModelError(
                errors.INSUFFICIENT_MEMORY,
                f"model {name!r} needs {needed} bytes, over the memory budget of {budget}",
            )
        # The weights, and for a moment the probe of their transient buffers.
        probe = weights.probe_allowance(path)
        if not self._make_room(needed + probe):
            raise ModelError(
                errors.INSUFFICIENT_MEMORY,
                f"model {name!r} needs {needed} bytes of weights (and {probe} more while it "
                f"loads); the memory budget of "
                f"{budget} is taken by running sequences and pinned models and entries",
            )
        started = time.perf_counter()
        try:
            # Lazy: the arrays only name their place in the files; weights.read_weights reads them.
            if self._config.distributed:  # this rank's share of the weights
                model, tokenizer, config = sharded_load(str(path), return_config=True)
            else:
                model, tokenizer, config = mlx_lm_load(str(path), return_config=True, lazy=True)
            report = functools.partial(on_progress, name) if on_progress else None
            nbytes = weights.read_weights(model, report)
            kv_per_token = weights.kv_bytes_per_token(model)
            context_length = config.get("max_position_embeddings")
            self.mlx_peak_floor = max(self.mlx_peak_floor, mx.get_peak_memory())
            scratch = weights.scratch_per_token(model, config, context_length)
            if self._agree is not None:  # every rank charges alike, so decides alike
                scratch = msgspec.msgpack.decode(
                    self._agree(msgspec.msgpack.encode(scratch)), type=tuple[float, float]
                )
            identity = weights.identity(path)
            vocab_size = weights.vocab_size(model, tokenizer)
            draft = None
            if options.draft is not None:
                draft, draft_bytes, draft_kv = self._load_draft(name, options.draft, vocab_size)
                nbytes += draft_bytes
                kv_per_token += draft_kv  # as if every sequence ran the draft beside it
        except ModelError:
            raise
        except Exception as exc:  # any failure to load is the model's, not the daemon's
            raise ModelError(errors.MODEL_LOAD_FAILED, f"loading {name!r} failed: {exc}") from exc
        pinned = name in self._config.pinned_models
        loaded = LoadedModel(
            name=name,
            path=path,
            model=model,
            tokenizer=tokenizer,
            nbytes=nbytes,
            identity=identity,
            vocab_size=vocab_size,
            context_length=context_length,
            keep_alive_s=-1.0 if pinned else self._config.keep_alive_s,
            kv_bytes_per_token=kv_per_token,
            scratch=scratch,
            num_layers=max(1, len(make_prompt_cache(model))),
            max_token_bytes=max_token_bytes(tokenizer),
            pinned_by_config=pinned,
            speculative=options.speculative,
            draft=draft,
            num_draft_tokens=options.num_draft_tokens,
        )
        self._resident[name] = loaded
        log.info(
            "model_loaded",
            model=name,
            path=str(path),
            bytes=nbytes,
            load_s=round(time.perf_counter() - started, 3),
        )
        if self._on_load is not None:
            self._on_load(loaded)
        return loaded

    def _load_draft(self, name: str, draft: str, vocab_size: int) -> tuple[Any, int, int]:
        """Model ``name``'s draft model ``draft``: (the model, its bytes, its KV bytes per
        token). Raises ``ModelError`` for one that is unknown or has another vocabulary."""
        try:
            path = self.resolve(draft)
        except ModelError as exc:
            raise ModelError(exc.code, f"the draft model of {name!r}: {exc.message}") from None
        model, tokenizer = mlx_lm_load(str(path), lazy=True)
        nbytes = weights.read_weights(model, None)
        if (size := weights.vocab_size(model, tokenizer)) != vocab_size:
            raise ModelError(
                errors.MODEL_LOAD_FAILED,
                f"the draft model {draft!r} of {name!r} has {size} tokens in its vocabulary, "
                f"{name!r} {vocab_size}: a draft must share the model's",
            )
        return model, nbytes, weights.kv_bytes_per_token(model)

    def _unload_idle_for(self, needed: int) -> bool:
        """The policy without a worker's budget: weights only, idle unpinned models go."""
        budget = self._config.memory_budget_bytes
        for victim in [m for m in self._resident.values() if m.active == 0 and not m.pinned]:
            if self.resident_bytes() + needed <= budget:
                break
            self.unload(victim.name, reason="memory_budget")
        return self.resident_bytes() + needed <= budget

    def unload(self, name: str, reason: str = "request") -> bool:
        loaded = self._resident.pop(name, None)
        if loaded is None:
            return False
        log.info("model_unloaded", model=name, bytes=loaded.nbytes, reason=reason)
        if self._on_unload is not None:
            self._on_unload(loaded)
        del loaded
        # Release the weights now, not at some later collection.
        gc.collect()
        mx.clear_cache()
        return True

    def sweep(self, now: float | None = None) -> None:
        """Unload idle models whose keep-alive has passed."""
        now = clock.wall() if now is None else now
        if self._stale:
            self._unload_stale()
        for m in list(self._resident.values()):
            if m.active == 0 and m.keep_alive_s >= 0 and now - m.last_used >= m.keep_alive_s:
                self.unload(m.name, reason="keep_alive")

    def next_expiry(self) -> float | None:
        """Seconds until the next keep-alive expiry, so the worker knows how long to sleep."""
        times = [
            m.last_used + m.keep_alive_s - clock.wall()
            for m in self._resident.values()
            if m.active == 0 and m.keep_alive_s >= 0
        ]
        return max(0.0, min(times)) if times else None

    def resident_bytes(self) -> int:
        return sum(m.nbytes for m in self._resident.values())

    def resident(self) -> list[LoadedModel]:
        return list(self._resident.values())

    def infos(self) -> list[ModelInfo]:
        infos = [m.info() for m in self._resident.values()]
        known = {i.name for i in infos}
        for name, source in self._aliases.items():
            if name not in known:
                with contextlib.suppress(hub.HubError):  # else the repo id, as it is
                    source = str(hub.source_dir(source))
                infos.append(ModelInfo(name=name, path=source, resident=False))
                known.add(name)
        if self._models_dir is not None and self._models_dir.is_dir():
            for sub in sorted(self._models_dir.iterdir()):
                if sub.name not in known and (sub / "config.json").is_file():
                    infos.append(ModelInfo(name=sub.name, path=str(sub), resident=False))
        return infos
