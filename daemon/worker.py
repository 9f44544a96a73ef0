"""The MLX worker: the one thread that touches MLX, and everything it owns.

The event loop hands commands to ``Worker`` through a thread-safe inbox (``submit``,
``cancel``, ``stop``); the worker thread loads models, prefills and decodes, and posts
protocol messages back through ``LoopOutbox``, one loop wake-up per decode round.

Continuous batching: each resident model with work has one mlx-lm ``BatchGenerator``;
concurrent sequences of that model decode together in one forward pass, new ones join
between steps (their prompts prefilled in chunks of ``prefill_step_size``, so a long prompt
never freezes the others' decoding), finished or cancelled ones leave. Models with work
take turns, one batch step each per round, so none starves. Between rounds the inbox is
drained, so a cancel takes effect before the cancelled sequence's next step.

Admission: waiting requests start in lane order (``interactive`` before ``background``,
a background request aged past ``background_aging_s`` counting as interactive), each when
its batch has room and the memory budget (daemon/memory.py) can set aside its KV.

Model loads run here too (MLX streams are thread-local), inside a round: the load
reports its progress as it reads the weights, and each report is posted to the requesting
sink at once (not with the round's events, which the load holds up) and refreshes the
snapshot's ``progress_at``, so the stall watchdog sees a long load moving.

Next-turn keys: a chat reply's state is stored under the tokens the next turn will send
for the same conversation (history plus this reply, rendered by the chat template), not
under the tokens it generated, so the next turn hits even where the template renders the
reply differently (a stop string, reasoning removed, an end-of-turn marker).

Paused owners: a connection whose replies pile up unread is paused by the loop
(``pause``/``resume``); its running sequences leave their batches with their state and go
on token-exact once it reads (daemon/pausing.py), and its waiting requests neither start
nor count toward ``max_queued``.

Big prompts are tokenized on a tokenizer thread (daemon/prompts.py) and come back through
the inbox as ``_Tokenized`` commands; a cancel marks its sink at once (``_cancelled``), so
requests still queued, in the inbox or for the tokenizer, are skipped.

Threading: ``submit``, ``cancel``, ``pause``, ``resume``, ``stop``, ``start`` and ``alive``
are for the event loop thread; the tokenizing job (daemon/rendering.py's ``prompt_tokens``)
runs on the tokenizer thread; every other method runs on the worker thread. No locks:
the inbox and outbox are thread-safe queues, and ``_cancelled`` a set only added to
(loop), read (tokenizer) and removed from (worker), each one atomic operation.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import structlog
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from mlxd.protocol import (
    CacheStats,
    CacheUse,
    Chunk,
    ClearCache,
    Done,
    Error,
    Generate,
    GetStats,
    ListModels,
    Load,
    MemoryStats,
    Progress,
    Queued,
    Timings,
    Unload,
    Usage,
    Warm,
    errors,
)

from .cache import Lease, Lookup, PromptCache, cache_bytes, cache_length, settle
from .config import Config
from .faults import Faults, InjectedCrash
from .memory import Footprint, MemoryBudget, generator_bytes, give_back_buffers
from .models import LoadedModel, ModelError, ModelRegistry, RequestError
from .outbox import Event, LoopOutbox
from .pausing import Held, can_pause, put_back, take_out
from .persist import PromptCacheStore
from .prompts import INLINE_CHARS, TokenizerThread, text_chars
from .rendering import FIM_TOKENS, fim_mode, next_turn_tokens, prompt_tokens, refuse_oversized
from .sampling import InvalidField, StopMatcher, make_sampling
from .solo import SoloGenerator

__all__ = [
    "FIM_TOKENS",
    "IDLE_TRIM_S",
    "Event",
    "LoopOutbox",
    "Worker",
    "WorkerRequest",
    "WorkerSnapshot",
    "WorkerStats",
]

log = structlog.get_logger("mlxd.worker")

IDLE_TRIM_S = 1.0
"""Idle seconds after which MLX's buffer cache is emptied."""

WorkerRequest = Generate | Warm | Load | Unload | ListModels | ClearCache | GetStats


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """The worker's half of a ``stats`` reply; the loop adds the connection counters."""

    active_sequences: int
    queued: int
    decode_steps: int
    tokens_generated: int
    prompt_tokens_processed: int
    sequences_preempted: int
    models_resident: int
    memory_active_bytes: int
    memory_peak_bytes: int
    cache: CacheStats
    memory: MemoryStats


@dataclass(frozen=True, slots=True)
class _Submit:
    request: WorkerRequest
    sink: Any
    received_at: float


@dataclass(frozen=True, slots=True)
class _Cancel:
    sink: Any


@dataclass(frozen=True, slots=True)
class _Preload:
    model: str


@dataclass(frozen=True, slots=True)
class _Reconfigure:
    config: Config


@dataclass(frozen=True, slots=True)
class _Pause:
    owner: Any
    paused: bool


class _Stop:
    pass


@dataclass(frozen=True, slots=True)
class _Tokenized:
    """A prompt tokenized on the tokenizer thread: its ``tokens``, or the ``error`` that
    refused it; neither when it was cancelled before its turn came."""

    request: Generate
    sink: Any
    received_at: float
    warm: Warm | None
    tokens: list[int] | None
    error: Exception | None


_Command = _Submit | _Cancel | _Preload | _Reconfigure | _Pause | _Stop | _Tokenized


def _owner(sink: Any) -> Any:
    """The key ``pause``/``resume`` name a sink by (its connection); None: never paused."""
    return getattr(sink, "owner", None)


@dataclass(eq=False)
class _Waiting:
    """A generate that is ready (model loaded, prompt tokenized) but its batch is full."""

    request: Generate
    sink: Any
    received_at: float
    model: LoadedModel
    prompt: list[int]
    sampler: Any
    processors: list[Any]
    footprint: Footprint
    warm: Warm | None = None
    position: int = -1
    paused: _Sequence | None = None
    """A sequence that left its batch while its owner was paused, to resume as it was."""
    held: Held | None = None

    def lane(self, now: float, aging_s: float) -> int:
        """0 goes first: interactive, or background that has waited long enough."""
        waited = now - self.received_at
        return 0 if self.request.priority == "interactive" or waited >= aging_s else 1


@dataclass(eq=False)
class _Batch:
    """One model's continuous batch: its ``BatchGenerator`` and the sequences in it."""

    model: LoadedModel
    generator: BatchGenerator | SoloGenerator
    sequences: dict[int, _Sequence] = field(default_factory=dict)  # by the generator's uid
    solo: bool = False
    config: Config | None = None
    """The configuration its sizes came from: rebuilt, once empty, after a reload."""


@dataclass(eq=False)
class _Sequence:
    request: Generate
    sink: Any
    model: LoadedModel
    batch: _Batch
    uid: int
    prompt: list[int]
    cache_use: CacheUse
    cached_tokens: int
    lease: Lease | None
    stop: StopMatcher
    received_at: float
    started_at: float
    span: int = 0
    """Tokens of KV it may hold: prompt plus max_tokens, at most the context."""
    max_tokens: int = 0
    """Tokens it may generate: ``max_tokens``, capped so that prompt plus generated tokens
    stay within the model's context (``span`` less the prompt)."""
    held: int = 0
    """Bytes of the cached state it took, until its prefill merges it into the batch."""
    warm: Warm | None = None
    detokenizer: Any = None
    first_token_at: float | None = None
    completion_tokens: int = 0
    text: list[str] = field(default_factory=list)
    """What was streamed, for the next turn's key."""
    eos: frozenset[int] = field(default_factory=frozenset)
    origin: _Waiting | None = None
    """Its queue entry: where it goes back to (with its sampler) if its owner is paused."""

    def footprint(self, prefill_step: int) -> Footprint:
        prefilling = self.first_token_at is None
        rest = len(self.prompt) - self.cached_tokens
        return Footprint(
            span=self.span,
            prefill=min(prefill_step, rest) if prefilling else 0,
            context=len(self.prompt),
            held=self.held if prefilling else 0,
        )


def _cancelled_unstarted(req: Generate | Warm, received_at: float, prompt_tokens: int) -> Done:
    """The end of a request cancelled before it was tokenized or queued."""
    waited = time.perf_counter() - received_at
    return Done(
        id=req.id,
        finish_reason="cancelled",
        usage=Usage(prompt_tokens=prompt_tokens, cached_tokens=0, completion_tokens=0),
        timings=Timings(queue_s=waited, ttft_s=waited, total_s=waited, tokens_per_s=0.0),
    )


def _pin_until(warm: Warm) -> float:
    if not warm.pin:
        return 0.0
    return math.inf if warm.ttl_s is None else time.time() + warm.ttl_s


def _cancelled_before_start(waiting: _Waiting) -> Done:
    if waiting.paused is not None:
        return _done(waiting.paused, "cancelled")
    waited = time.perf_counter() - waiting.received_at
    return Done(
        id=waiting.request.id,
        finish_reason="cancelled",
        fim=fim_mode(waiting.request, waiting.model),  # type: ignore[arg-type]
        usage=Usage(prompt_tokens=len(waiting.prompt), cached_tokens=0, completion_tokens=0),
        timings=Timings(queue_s=waited, ttft_s=waited, total_s=waited, tokens_per_s=0.0),
    )


def _done(seq: _Sequence, reason: str) -> Done:
    now = time.perf_counter()
    first = seq.first_token_at or now
    decode_s = now - first
    return Done(
        id=seq.request.id,
        finish_reason=reason,  # type: ignore[arg-type]
        stop_sequence=seq.stop.matched if reason == "stop" else None,
        usage=Usage(
            prompt_tokens=len(seq.prompt),
            cached_tokens=seq.cached_tokens,
            completion_tokens=0 if seq.warm else seq.completion_tokens,
        ),
        timings=Timings(
            queue_s=seq.started_at - seq.received_at,
            ttft_s=first - seq.received_at,
            total_s=now - seq.received_at,
            tokens_per_s=(seq.completion_tokens - 1) / decode_s
            if seq.completion_tokens > 1 and decode_s > 0
            else 0.0,
        ),
        cache=seq.cache_use,
        fim=fim_mode(seq.request, seq.model),  # type: ignore[arg-type]
    )


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """What the loop may know of the worker without asking it: replaced whole (one atomic
    attribute store) by the worker at each round, read by the loop for ``health``."""

    round_started: float
    idle: bool
    queued: int
    active_sequences: int
    models_resident: tuple[str, ...]
    progress_at: float = 0.0
    """The worker's last sign of life in this round: its start, or a step of a model load.
    The stall watchdog measures from here; ``health``'s busy time from ``round_started``."""


class Worker:
    def __init__(
        self,
        config: Config,
        outbox: LoopOutbox,
        on_death: Callable[[BaseException], None],
    ) -> None:
        self._config = config
        self._outbox = outbox
        self._on_death = on_death
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mlxd-worker", daemon=True)
        self._cache = PromptCache(config.cache_max_bytes, config.cache_max_entries)
        self._restored: set[str] = set()
        self._models = ModelRegistry(
            config,
            on_load=self._model_loaded,
            on_unload=self._model_unloaded,
            make_room=lambda needed: self._budget.make_room(needed),
        )
        self._active: dict[Any, _Sequence] = {}  # by sink
        self._budget = MemoryBudget(
            config.memory_budget_bytes,
            config.memory_headroom,
            self._cache,
            self._models,
            self._live,
        )
        # By (model name, solo?), in turn order: each model has at most one BatchGenerator
        # and one SoloGenerator running at a time.
        self._batches: dict[tuple[str, bool], _Batch] = {}
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._tokens_generated = 0
        self._decode_steps = 0
        self._prompt_tokens_processed = 0
        self._paused: set[Any] = set()  # owners whose replies pile up unread
        self._preempted = 0
        self._stopping = False
        self._faults = Faults()
        self._store = PromptCacheStore(config.cache_dir(), config.socket_path, self._faults)
        self.snapshot = WorkerSnapshot(time.monotonic(), True, 0, 0, ())
        self._swept_at = 0.0
        self._tokenizer = TokenizerThread()
        # Sinks the loop cancelled (added on its thread, at once): the tokenizer thread and
        # the worker skip their requests still in a queue, not only when the cancel's turn
        # in the inbox comes. The worker removes each once nothing more can see it.
        self._cancelled: set[Any] = set()
        self._tokenizing: dict[Any, Generate] = {}  # sinks on the tokenizer thread

    # ------------------------------------------------------------------ event loop thread

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: WorkerRequest, sink: Any, received_at: float) -> None:
        self._inbox.put(_Submit(request, sink, received_at))

    def preload(self, model: str) -> None:
        """Load ``model`` ahead of its first request; a failure is logged, not fatal."""
        self._inbox.put(_Preload(model))

    def cancel(self, sink: Any) -> None:
        self._cancelled.add(sink)
        self._inbox.put(_Cancel(sink))

    def pause(self, owner: Any) -> None:
        """``owner``'s replies pile up unread: its sequences leave their batches (keeping
        their state) and its waiting requests wait, until ``resume``."""
        self._inbox.put(_Pause(owner, True))

    def resume(self, owner: Any) -> None:
        self._inbox.put(_Pause(owner, False))

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` (a SIGHUP reload) for every command queued after this one."""
        self._inbox.put(_Reconfigure(config))

    def stop(self) -> None:
        self._inbox.put(_Stop())

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        try:
            self._budget.apply_platform_limits()
            while not self._stopping:
                if self._faults and self._faults.hit("worker_crash"):
                    raise InjectedCrash("injected worker crash (MLXD_FAULTS)")
                events: list[Event] = []
                commands = self._take_commands()
                self._publish(idle=False)
                if self._faults and self._faults.hit("worker_stall"):
                    time.sleep(3.0)  # as a long model load or a huge step would
                for command in commands:
                    self._handle(command, events)
                self._admit(events)
                self._budget.note()
                self._outbox.post(events)
                if self._active:
                    self._step_all()
                now = time.monotonic()
                if not self._active or now - self._swept_at >= 1.0:
                    # Busy rounds check keep-alives once a second: an idle model is
                    # unloaded on time even while another model is generating.
                    self._models.sweep()
                    self._swept_at = now
            self._end_all(errors.SHUTTING_DOWN, "the daemon is shutting down")
            self._persist_cache()
            mx.synchronize()  # no MLX work may outlive the thread that queued it
        except BaseException as exc:
            log.critical("worker_died", error=repr(exc), traceback=traceback.format_exc())
            self._on_death(exc)

    def _publish(self, idle: bool) -> None:
        now = time.monotonic()
        self.snapshot = WorkerSnapshot(
            round_started=now,
            progress_at=now,
            idle=idle,
            queued=len(self._waiting),
            active_sequences=len(self._active),
            models_resident=tuple(m.name for m in self._models.resident()),
        )

    def _take_commands(self) -> list[_Command]:
        commands = []
        if not self._active and not self._waiting:
            # Idle: sleep until a command comes or a model's keep-alive expires.
            self._publish(idle=True)
            timeout = self._models.next_expiry()
            if mx.get_cache_memory():
                # Give MLX's buffer cache back to the system once idle for a moment (not
                # between the keystrokes of a burst, which reuse it).
                timeout = IDLE_TRIM_S if timeout is None else min(timeout, IDLE_TRIM_S)
            try:
                commands.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                give_back_buffers()
                return commands
        with contextlib.suppress(queue.Empty):
            while True:
                commands.append(self._inbox.get_nowait())
        return commands

    def _handle(self, command: _Command, events: list[Event]) -> None:
        if isinstance(command, _Stop):
            self._stopping = True
            return
        if isinstance(command, _Cancel):
            if command.sink not in self._tokenizing:
                self._cancelled.discard(command.sink)  # else its _Tokenized still has to see it
            seq = self._active.get(command.sink)
            if seq is not None:
                self._finish(seq, "cancelled", events)
            for waiting in [w for w in self._waiting if w.sink is command.sink]:
                self._waiting.remove(waiting)
                waiting.model.active -= 1
                events.append((waiting.sink, _cancelled_before_start(waiting)))
            return
        if isinstance(command, _Pause):
            if command.paused:
                self._paused.add(command.owner)
            else:
                self._paused.discard(command.owner)
            return
        if isinstance(command, _Reconfigure):
            # Between rounds: running sequences go on as they were; the new aliases, limits
            # and budgets apply from the next request on.
            self._config = command.config
            self._models.reconfigure(command.config)
            self._cache.set_limits(command.config.cache_max_bytes, command.config.cache_max_entries)
            self._budget.limit = command.config.memory_budget_bytes
            self._budget.headroom = command.config.memory_headroom
            self._budget.bound_buffer_cache()
            return
        if isinstance(command, _Preload):
            try:
                # The registry logs the load; no one to tell of its progress but the watchdog.
                self._models.get(command.model, on_progress=self._load_progress(None, 0))
            except ModelError as exc:
                log.error("preload_failed", model=command.model, code=exc.code, error=exc.message)
            return
        req = command.request
        if isinstance(command, _Tokenized):
            self._tokenizing.pop(command.sink, None)
        if isinstance(req, Generate | Warm) and command.sink in self._cancelled:
            # Cancelled (or its connection gone) while it waited in the inbox or to be
            # tokenized: no model load, no tokenizing, no place in the queue.
            tokens = command.tokens if isinstance(command, _Tokenized) else None
            if isinstance(command, _Tokenized):
                self._cancelled.discard(command.sink)
            events.append(
                (command.sink, _cancelled_unstarted(req, command.received_at, len(tokens or ())))
            )
            return
        try:
            reply = self._serve(command, events)
            if reply is not None:
                events.append((command.sink, reply))
        except RequestError as exc:
            events.append((command.sink, Error(id=req.id, code=exc.code, message=exc.message)))
        except InvalidField as exc:
            error = Error(id=req.id, code=errors.INVALID_REQUEST, message=str(exc), field=exc.field)
            events.append((command.sink, error))
        except Exception as exc:
            log.exception("request_failed", request_id=req.id)
            events.append(
                (command.sink, Error(id=req.id, code=errors.INTERNAL_ERROR, message=repr(exc)))
            )

    def _serve(self, command: _Submit | _Tokenized, events: list[Event]) -> Any:
        """Serve one request; returns its reply, or None for a generation now running."""
        if isinstance(command, _Tokenized):
            if command.error is not None:
                raise command.error
            self._start(
                command.request,
                command.sink,
                command.received_at,
                events,
                warm=command.warm,
                tokens=command.tokens,
            )
            return None
        req = command.request
        if isinstance(req, Generate):
            self._start(req, command.sink, command.received_at, events)
            return None
        if isinstance(req, Warm):
            if self._cache.max_bytes <= 0:
                raise InvalidField("$.type", "the prompt cache is disabled on this daemon")
            # A one-token generation that streams nothing: the prefill is the point.
            as_generate = Generate(
                id=req.id,
                model=req.model,
                prompt=req.prompt,
                messages=req.messages,
                tokens=req.tokens,
                max_tokens=1,
                keep_alive=req.keep_alive,
                priority=req.priority,
            )
            self._start(as_generate, command.sink, command.received_at, events, warm=req)
            return None
        if isinstance(req, Load):
            progress = self._load_progress(command.sink, req.id)
            loaded = self._models.get(req.model, req.keep_alive, progress)
            return Done(id=req.id, model=loaded.info())
        if isinstance(req, Unload):
            for seq in [s for s in self._active.values() if s.model.name == req.model]:
                self._finish(seq, "cancelled", events)
            for waiting in [w for w in self._waiting if w.model.name == req.model]:
                self._waiting.remove(waiting)
                waiting.model.active -= 1
                events.append((waiting.sink, _cancelled_before_start(waiting)))
            self._models.unload(req.model)  # closes its batch (_model_unloaded)
            return Done(id=req.id)
        if isinstance(req, ListModels):
            return Done(id=req.id, models=self._models.infos())
        if isinstance(req, ClearCache):
            dropped = self._cache.clear(req.model)
            give_back_buffers()  # the entries' memory goes back to the system, not MLX's pool
            log.info("cache_cleared", model=req.model, entries=dropped)
            return Done(id=req.id)
        return self._stats(req.reset_peak)

    def _load_progress(self, sink: Any, request_id: int) -> Callable[[str, int, int], None]:
        """How a model load that request ``request_id`` waits on reports its progress: a
        ``progress`` message posted to ``sink`` (if any) right away, so it reaches the
        client while the load goes on, and a fresh ``progress_at`` for the watchdog."""

        def report(model: str, done: int, total: int) -> None:
            self.snapshot = dataclasses.replace(self.snapshot, progress_at=time.monotonic())
            if sink is not None:
                message = Progress(
                    id=request_id,
                    stage="loading",
                    model=model,
                    done_bytes=done,
                    total_bytes=total,
                )
                self._outbox.post([(sink, message)])

        return report

    def _stats(self, reset_peak: bool = False) -> WorkerStats:
        return WorkerStats(
            active_sequences=len(self._active),
            queued=len(self._waiting),
            decode_steps=self._decode_steps,
            tokens_generated=self._tokens_generated,
            prompt_tokens_processed=self._prompt_tokens_processed,
            sequences_preempted=self._preempted,
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

    # ------------------------------------------------------------------ the prompt cache

    def _model_loaded(self, loaded: LoadedModel) -> None:
        if not self._config.cache_persist or loaded.name in self._restored:
            return
        self._restored.add(loaded.name)
        try:
            n = self._store.restore(self._cache, loaded.name, loaded.identity)
        except Exception as exc:  # a saved cache is an optimisation: never fail a load for it
            log.warning("cache_restore_failed", model=loaded.name, error=repr(exc))
            return
        if n:
            log.info("cache_restored", model=loaded.name, entries=n)

    def _model_unloaded(self, loaded: LoadedModel) -> None:
        self._cache.drop_model(loaded.name)
        for solo in (False, True):
            batch = self._batches.pop((loaded.name, solo), None)
            if batch is not None:
                batch.generator.close()

    def _runs_solo(self, loaded: LoadedModel, waiting: _Waiting | None = None) -> bool:
        """Whether a new sequence of ``loaded`` (``waiting``, if it is still in the queue)
        would run alone: nothing else of its model runs or waits."""
        others = any(
            w.model is loaded and w is not waiting and _owner(w.sink) not in self._paused
            for w in self._waiting
        )
        return self._running(loaded) == 0 and not others

    def _batch_for(self, loaded: LoadedModel) -> _Batch:
        """Where a new sequence of ``loaded`` runs: alone on ``generate_step`` when the model
        has nothing else running (no batching overhead), else in the model's batch."""
        if self._runs_solo(loaded):
            eos = frozenset(loaded.tokenizer.eos_token_ids)
            solo = SoloGenerator(loaded.model, eos, self._config.prefill_step_size)
            batch = _Batch(loaded, solo, solo=True)
            self._batches[loaded.name, True] = batch
            return batch
        batch = self._batches.get((loaded.name, False))
        if batch is not None and not batch.sequences and batch.config is not self._config:
            batch.generator.close()  # built before a reload: take the new sizes
            batch = None
        if batch is None or batch.model is not loaded:
            config = self._config
            generator = BatchGenerator(
                loaded.model,
                stop_tokens=[[t] for t in loaded.tokenizer.eos_token_ids],
                completion_batch_size=config.max_batch_size,
                prefill_batch_size=min(config.prefill_batch_size, config.max_batch_size),
                prefill_step_size=config.prefill_step_size,
            )
            batch = self._batches[loaded.name, False] = _Batch(loaded, generator, config=config)
        return batch

    def _running(self, loaded: LoadedModel) -> int:
        return sum(
            len(b.sequences) for (name, _), b in self._batches.items() if name == loaded.name
        )

    def _persist_cache(self) -> None:
        if not self._config.cache_persist or not len(self._cache) or not self._store.usable():
            return
        identities = {m.name: m.identity for m in self._models.resident()}
        try:
            n = self._store.save(self._cache, identities, self._config.cache_persist_max_bytes)
            log.info("cache_saved", entries=n, dir=str(self._store.folder))
        except Exception as exc:  # a full disk is a RuntimeError from mlx: never fail shutdown
            log.error("cache_save_failed", dir=str(self._store.folder), error=repr(exc))

    def _lookup(self, req: Generate, loaded: LoadedModel, tokens: list[int]) -> Lookup:
        if not req.cache or self._cache.max_bytes <= 0:
            return Lookup(None, 0, "bypass")
        return self._cache.fetch(loaded.name, tokens)

    def _live(self) -> dict[str, tuple[int, int]]:
        """(KV, scratch) bytes set aside for the running sequences, by model."""
        live: dict[str, tuple[int, int]] = {}
        for batch in self._batches.values():
            if batch.sequences:
                kv, scratch = self._generator_bytes(batch)
                had = live.get(batch.model.name, (0, 0))
                live[batch.model.name] = (had[0] + kv, had[1] + scratch)
        for waiting in self._waiting:
            if waiting.held is not None:  # a paused sequence's state, out of any batch
                had = live.get(waiting.model.name, (0, 0))
                live[waiting.model.name] = (had[0] + waiting.held.nbytes, had[1])
        return live

    def _prefill_group(self) -> int:
        return min(self._config.prefill_batch_size, self._config.max_batch_size)

    def _generator_bytes(self, batch: _Batch, extra: Footprint | None = None) -> tuple[int, int]:
        step = self._config.prefill_step_size
        sequences = [s.footprint(step) for s in batch.sequences.values()]
        if extra is not None:
            sequences.append(extra)
        return generator_bytes(
            batch.model, sequences, self._prefill_group(), batched=not batch.solo
        )

    def _footprint(self, loaded: LoadedModel, prompt: list[int], max_tokens: int) -> Footprint:
        span = len(prompt) + max_tokens
        if loaded.context_length:
            span = min(span, loaded.context_length)
        # At admission the cached share of the prompt is not known yet: the whole of it.
        prefill = min(self._config.prefill_step_size, len(prompt))
        return Footprint(span=span, prefill=prefill, context=len(prompt))

    def _needed(self, waiting: _Waiting) -> int:
        """Bytes that starting ``waiting`` adds: its own KV and scratch, and the padding it
        gives the batch it joins (or all of a generator's, when it starts one)."""
        loaded, footprint = waiting.model, waiting.footprint
        batch = self._batches.get((loaded.name, False))
        if batch is None or not batch.sequences or batch.model is not loaded:
            batched = not self._runs_solo(loaded, waiting)
            return sum(generator_bytes(loaded, [footprint], 1, batched=batched))
        return sum(self._generator_bytes(batch, footprint)) - sum(self._generator_bytes(batch))

    def _start(
        self,
        req: Generate,
        sink: Any,
        received_at: float,
        events: list[Event],
        warm: Warm | None = None,
        tokens: list[int] | None = None,
    ) -> None:
        if req.max_tokens > self._config.max_tokens_limit:
            raise InvalidField(
                "$.max_tokens",
                f"max_tokens is over this daemon's limit of {self._config.max_tokens_limit}",
            )
        loaded = self._models.get(req.model, req.keep_alive, self._load_progress(sink, req.id))
        if tokens is None:
            if self._tokenize_elsewhere(req, sink, received_at, loaded, warm):
                return  # back as a _Tokenized command, which calls this again with them
            tokens = prompt_tokens(req, loaded, self._config.max_prompt_tokens, warm is not None)
        footprint = self._footprint(loaded, tokens, req.max_tokens)
        kv, scratch = generator_bytes(loaded, [footprint], 1, batched=False)
        if loaded.nbytes + kv + scratch > self._budget.usable:
            raise RequestError(
                errors.INSUFFICIENT_MEMORY,
                f"this request's KV state and transient buffers ({kv} + {scratch} bytes for "
                f"{len(tokens)} prompt tokens and max_tokens {req.max_tokens}) do not fit the "
                "memory budget "
                f"({self._budget.usable} bytes usable of {self._budget.limit}) beside the "
                "model's weights, even alone",
            )
        sampler, processors = make_sampling(req, loaded.vocab_size)
        free = max(0, self._config.max_batch_size - self._running(loaded))
        waiting = self._queued()
        if waiting >= self._config.max_queued + free:
            raise RequestError(
                errors.OVERLOADED,
                f"{waiting} requests are already waiting (max_queued)",
            )
        loaded.active += 1  # reserved: a model with waiting work is not unloaded
        # Admitted by the run loop once the whole inbox is read, so that a burst of
        # requests is seen as one and batched from its first step.
        self._waiting.append(
            _Waiting(req, sink, received_at, loaded, tokens, sampler, processors, footprint, warm)
        )

    def _tokenize_elsewhere(
        self, req: Generate, sink: Any, received_at: float, loaded: LoadedModel, warm: Warm | None
    ) -> bool:
        """Refuse a prompt that its size alone puts over the limits; hand a big one to the
        tokenizer thread (True), whose result comes back through the inbox."""
        refuse_oversized(req, loaded, self._config.max_prompt_tokens)
        if req.tokens is not None or text_chars(req) <= INLINE_CHARS:
            return False
        self._tokenizing[sink] = req

        def job() -> None:  # on the tokenizer thread: HF tokenizer work only, no MLX
            tokens: list[int] | None = None
            error: Exception | None = None
            if sink not in self._cancelled:
                try:
                    cap = self._config.max_prompt_tokens
                    tokens = prompt_tokens(req, loaded, cap, warm is not None)
                except Exception as exc:  # the worker replies with it, as if it were its own
                    error = exc
            self._inbox.put(_Tokenized(req, sink, received_at, warm, tokens, error))

        self._tokenizer.submit(job)
        return True

    def _batch_full(self, loaded: LoadedModel) -> bool:
        return self._running(loaded) >= self._config.max_batch_size

    def _admit(self, events: list[Event]) -> None:
        """Start waiting requests, in lane order, where their model's batch has room and
        the budget can set their KV aside; tell the others their place when it changed. A
        paused owner's requests wait, ahead of no one: they neither start nor get a place."""
        if self._paused:
            self._pause_running(events)
        position = 0
        now = time.perf_counter()
        aging = self._config.background_aging_s
        # Once a request waits for memory, lower lanes wait too: they would take the room
        # it waits for.
        held_below: int | None = None
        # sorted() is stable: arrival order within a lane.
        for waiting in sorted(self._waiting, key=lambda w: w.lane(now, aging)):
            if self._paused and _owner(waiting.sink) in self._paused:
                continue
            lane = waiting.lane(now, aging)
            admit = not self._batch_full(waiting.model) and (
                held_below is None or lane <= held_below
            )
            if admit and self._room_for(waiting, lane, events):
                self._waiting.remove(waiting)
                waiting.model.active -= 1
                try:
                    if waiting.held is not None:
                        self._resume(waiting)
                    else:
                        self._begin(waiting)
                        self._active[waiting.sink].origin = waiting
                except Exception as exc:
                    log.exception("request_failed", request_id=waiting.request.id)
                    error = Error(
                        id=waiting.request.id, code=errors.INTERNAL_ERROR, message=repr(exc)
                    )
                    events.append((waiting.sink, error))
                continue
            if waiting not in self._waiting:
                continue  # refused by _room_for
            if admit and held_below is None:
                held_below = lane  # it waits for memory
            if waiting.position != position:
                waiting.position = position
                events.append((waiting.sink, Queued(id=waiting.request.id, position=position)))
            position += 1

    def _queued(self) -> int:
        """Requests waiting for a place, less a paused owner's: a client that does not read
        its replies cannot fill the queue for the others (its own requests are bounded by
        ``max_requests_per_connection``)."""
        if not self._paused:
            return len(self._waiting)
        return sum(1 for w in self._waiting if _owner(w.sink) not in self._paused)

    def _pause_running(self, events: list[Event]) -> None:
        """Paused owners' running sequences leave their batches and wait, state kept (see
        daemon/pausing.py). One still prefilling leaves after its first token; a warm-up
        ends with its prefill anyway."""
        for seq in [s for s in self._active.values() if _owner(s.sink) in self._paused]:
            if seq.first_token_at is None or seq.warm is not None or seq.origin is None:
                continue
            if not can_pause(seq.model):
                continue
            waiting = seq.origin
            held = take_out(seq.batch.generator, seq.uid, waiting.sampler)
            self._active.pop(seq.sink, None)
            seq.batch.sequences.pop(seq.uid, None)
            if seq.batch.solo:
                self._batches.pop((seq.model.name, True), None)  # remove() closed it
            if seq.lease is not None:
                self._cache.release(seq.lease)  # a solo state others forked from: no longer live
                seq.lease = None
            if held is None:
                seq.model.active -= 1
                message = "the sequence's state could not be kept while it was paused"
                events.append(
                    (
                        seq.sink,
                        Error(id=seq.request.id, code=errors.INTERNAL_ERROR, message=message),
                    )
                )
                continue
            # Back in the queue in arrival order; the model stays reserved (``active``).
            waiting.paused, waiting.held, waiting.position = seq, held, -1
            waiting.footprint = Footprint(
                span=seq.span, prefill=len(held.feed), context=len(held.tokens) + len(held.feed)
            )
            at = next(
                (i for i, w in enumerate(self._waiting) if w.received_at > waiting.received_at),
                len(self._waiting),
            )
            self._waiting.insert(at, waiting)
            self._preempted += 1

    def _resume(self, waiting: _Waiting) -> None:
        """Put a paused sequence back into a batch: it goes on where it was."""
        seq, held = waiting.paused, waiting.held
        assert seq is not None and held is not None
        batch = self._batch_for(waiting.model)
        remaining = seq.max_tokens - seq.completion_tokens  # capped at the context
        uid = put_back(batch.generator, held, remaining, waiting.sampler, waiting.processors)
        waiting.model.active += 1
        waiting.paused = waiting.held = None
        seq.batch, seq.uid = batch, uid
        batch.sequences[uid] = seq
        self._active[seq.sink] = seq

    def _room_for(self, waiting: _Waiting, lane: int, events: list[Event]) -> bool:
        """Whether the budget can set ``waiting``'s KV aside now (freeing cache entries and
        idle models if need be; background work that has to share takes neither the cached
        states interactive work comes back to nor a model). If not, it waits for running
        sequences to end; with none running, nothing will free up, so it is refused."""
        needed = self._needed(waiting)
        if waiting.held is not None:
            # Already counted (``_live``); it moves into the batch's arrays as it joins.
            needed = max(0, needed - waiting.held.nbytes)
        background = lane == 1 and bool(self._active)
        if self._budget.make_room(needed, keep=waiting.model, for_background=background):
            return True
        if not self._active:
            self._waiting.remove(waiting)
            waiting.model.active -= 1
            message = (
                f"{needed} bytes of KV state and transient buffers do not fit the memory budget of "
                f"{self._budget.usable} usable beside the resident weights and pinned cache entries"
            )
            events.append(
                (
                    waiting.sink,
                    Error(id=waiting.request.id, code=errors.INSUFFICIENT_MEMORY, message=message),
                )
            )
        return False

    def _begin(self, waiting: _Waiting) -> None:
        req, loaded, tokens = waiting.request, waiting.model, waiting.prompt
        sink, received_at = waiting.sink, waiting.received_at
        sampler, processors = waiting.sampler, waiting.processors
        lookup = self._lookup(req, loaded, tokens)
        batch = self._batch_for(loaded)
        # No decoding past the model's context: what the footprint's span was charged for.
        max_tokens = waiting.footprint.span - len(tokens)
        (uid,) = batch.generator.insert(
            [tokens[lookup.reused :]],
            max_tokens=[max_tokens],
            caches=[lookup.state],
            # The cached part of the prompt: context for the penalties, and the start of
            # the token list the generator returns with the final state (the cache key).
            all_tokens=[tokens[: lookup.reused]],
            samplers=[sampler],
            logits_processors=[processors],
        )
        loaded.active += 1
        use = CacheUse(kind=lookup.kind, miss_reason=lookup.miss_reason)  # type: ignore[arg-type]
        # A state others may fork the prompt's prefix from while this sequence runs: a
        # solo sequence's live state (it only grows past the prompt), or the state a
        # batch started from (merged into the batch's own arrays, never written to).
        source = batch.generator.state if isinstance(batch.generator, SoloGenerator) else None
        source = source or lookup.state
        lease = None
        if source is not None and use.kind != "bypass":
            lease = self._cache.lease(loaded.name, tokens, source)
        seq = _Sequence(
            request=req,
            sink=sink,
            model=loaded,
            batch=batch,
            uid=uid,
            prompt=tokens,
            cache_use=use,
            cached_tokens=lookup.reused,
            lease=lease,
            stop=StopMatcher(req.stop),
            received_at=received_at,
            started_at=time.perf_counter(),
            span=waiting.footprint.span,
            max_tokens=max_tokens,
            # A solo sequence grows the state it took in place: its KV charge covers it.
            held=0 if batch.solo or lookup.state is None else cache_bytes(lookup.state),
            warm=waiting.warm,
            detokenizer=loaded.tokenizer.detokenizer,
            eos=frozenset(loaded.tokenizer.eos_token_ids),
        )
        batch.sequences[uid] = seq
        self._active[sink] = seq

    def _step_all(self) -> None:
        """One step of every model's batch: the models with work take turns."""
        events: list[Event] = []
        for batch in [b for b in self._batches.values() if b.sequences]:
            try:
                if self._faults and self._faults.hit(f"step_error:{batch.model.name}"):
                    raise RuntimeError("injected step error (MLXD_FAULTS)")
                _, responses = batch.generator.next()
                # Copy the states of the sequences that ended out now, while the batch's old
                # arrays are still there anyway: left lazy, they would keep those arrays alive
                # beside the filtered batch's new ones (a whole second copy of the batch).
                ended = [r.prompt_cache for r in responses if r.finish_reason and r.prompt_cache]
                mx.eval([c.state for state in ended for c in state])
            except Exception as exc:
                # The batch's state can no longer be trusted: fail its sequences, start over.
                log.exception("batch_failed", model=batch.model.name)
                for seq in list(batch.sequences.values()):
                    self._drop(seq, None)
                    error = Error(id=seq.request.id, code=errors.INTERNAL_ERROR, message=repr(exc))
                    events.append((seq.sink, error))
                self._batches.pop((batch.model.name, batch.solo), None)
                batch.generator.close()
                continue
            if responses:
                self._decode_steps += 1
            for response in responses:
                seq = batch.sequences.get(response.uid)
                if seq is not None:
                    self._step(seq, response, events)
        self._outbox.post(events)

    def _step(self, seq: _Sequence, response: Any, events: list[Event]) -> None:
        token = response.token
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            self._prompt_tokens_processed += len(seq.prompt) - seq.cached_tokens
        if response.finish_reason is not None:
            final = (response.prompt_cache, response.all_tokens)
        else:
            final = None
        if token in seq.eos:
            seq.detokenizer.finalize()
            self._finish(seq, "stop", events, seq.detokenizer.last_segment, final=final)
            return
        seq.completion_tokens += 1
        self._tokens_generated += 1
        seq.detokenizer.add_token(token)
        if seq.completion_tokens >= seq.max_tokens:
            seq.detokenizer.finalize()
            text = seq.detokenizer.last_segment
            self._finish(seq, "length", events, text, [token], final=final)
            return
        text, stopped = seq.stop.feed(seq.detokenizer.last_segment)
        if stopped:
            self._finish(seq, "stop", events, text, [token], stopped=True, final=final)
        elif seq.warm is None:
            seq.text.append(text)
            events.append((seq.sink, Chunk(id=seq.request.id, text=text, tokens=[token])))

    def _finish(
        self,
        seq: _Sequence,
        reason: str,
        events: list[Event],
        text: str = "",
        tokens: list[int] | None = None,
        stopped: bool = False,
        final: tuple[list[Any], list[int]] | None = None,
    ) -> None:
        """End ``seq``: its last chunk, then ``done``. ``final`` is the (state, tokens) the
        generator returned if it ended the sequence itself; else the state is taken out."""
        if reason != "cancelled":
            if not stopped:
                text, stopped = seq.stop.feed(text)
                text += "" if stopped else seq.stop.flush()
                reason = "stop" if stopped else reason
            if (text or tokens) and seq.warm is None:
                seq.text.append(text)
                events.append((seq.sink, Chunk(id=seq.request.id, text=text, tokens=tokens or [])))
        if final is None:
            removed = seq.batch.generator.remove([seq.uid], return_prompt_caches=True)
            final = removed.get(seq.uid)
        cached = self._drop(seq, final, finished=reason != "cancelled")
        if seq.warm is not None and reason != "cancelled" and not cached:
            message = "the prefilled state did not fit the prompt cache or the memory budget"
            events.append(
                (
                    seq.sink,
                    Error(id=seq.request.id, code=errors.INSUFFICIENT_MEMORY, message=message),
                )
            )
            return
        events.append((seq.sink, _done(seq, reason)))

    def _drop(
        self,
        seq: _Sequence,
        final: tuple[list[Any], list[int]] | None,
        finished: bool = False,
    ) -> bool:
        """Forget ``seq``; ``final`` (its KV state and every token it holds) goes back to the
        prompt cache, so the next turn or keystroke starts from it. Returns whether it did."""
        self._active.pop(seq.sink, None)
        seq.batch.sequences.pop(seq.uid, None)
        if seq.batch.solo:
            self._batches.pop((seq.model.name, True), None)
        seq.model.active -= 1
        seq.model.touch(None)
        if seq.lease is not None:
            self._cache.release(seq.lease)
        if final is None or not seq.request.cache or self._cache.max_bytes <= 0:
            return False
        state, tokens = final
        if not (state and tokens and seq.model in self._models.resident()):
            return False
        tokens = list(tokens)
        pin = None
        if seq.warm is not None:
            pin = _pin_until(seq.warm)
        elif finished and seq.request.messages is not None:
            tokens, state = self._next_turn_key(seq, tokens, state)
        # The state can hold one token more than was streamed (the step ahead), and room to
        # grow: trimmed to the key and copied compact before room is made for it.
        settled = settle(state, tokens)
        if not settled:
            return False
        # Background work's states take the room of no other work's entries.
        background = seq.request.priority == "background"
        if not self._budget.make_room(
            cache_bytes(state), unload_models=False, for_background=background
        ):
            return False
        return self._cache.insert(
            seq.model.name, settled, state, pin_until=pin, background=background
        )

    def _next_turn_key(
        self, seq: _Sequence, tokens: list[int], state: list[Any]
    ) -> tuple[list[int], list[Any]]:
        """Re-key a chat reply's state by the tokens the next turn starts with: the history
        plus this reply, rendered by the template. Where the rendering departs from what was
        generated (the end-of-turn marker, a stop string, reasoning the template drops), trim
        the state back to where they agree and prefill the rendered rest, a few tokens."""
        assert seq.request.messages is not None
        reply = "".join(seq.text)
        rendered = next_turn_tokens(seq.request.messages, reply, seq.model.tokenizer)
        if rendered is None:
            return tokens, state
        held = min(len(tokens), cache_length(state))
        common = 0
        for a, b in zip(tokens[:held], rendered, strict=False):
            if a != b:
                break
            common += 1
        rest = rendered[common:]
        if not rest:
            return rendered, state
        if len(rest) > self._config.prefill_step_size or not can_trim_prompt_cache(state):
            return tokens, state
        excess = cache_length(state) - common
        if excess > 0:
            trim_prompt_cache(state, excess)
        seq.model.model(mx.array([rest]), cache=state)
        mx.eval([c.state for c in state])
        return rendered, state

    def _end_all(self, code: str, message: str) -> None:
        events: list[Event] = []
        for seq in list(self._active.values()):
            removed = seq.batch.generator.remove([seq.uid], return_prompt_caches=True)
            self._drop(seq, removed.get(seq.uid))
            events.append((seq.sink, Error(id=seq.request.id, code=code, message=message)))
        while self._waiting:
            waiting = self._waiting.popleft()
            waiting.model.active -= 1
            events.append((waiting.sink, Error(id=waiting.request.id, code=code, message=message)))
        for sink, req in self._tokenizing.items():
            events.append((sink, Error(id=req.id, code=code, message=message)))
        self._tokenizing.clear()
        self._tokenizer.stop()
        self._outbox.post(events)
