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

import contextlib
import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import structlog

from mlxd.protocol import (
    CacheStats,
    ClearCache,
    Done,
    Error,
    Generate,
    GetStats,
    ListModels,
    Load,
    MemoryStats,
    Progress,
    Unload,
    Warm,
    errors,
)

from .admission import Admission
from .cache import PromptCache
from .config import Config
from .endings import cancelled_unstarted
from .faults import Faults, InjectedCrash
from .memory import MemoryBudget, give_back_buffers
from .models import LoadedModel, ModelError, ModelRegistry, RequestError
from .outbox import Event, LoopOutbox
from .persist import PromptCacheStore
from .prompts import INLINE_CHARS, TokenizerThread, text_chars
from .rendering import FIM_TOKENS, prompt_tokens, refuse_oversized
from .sampling import InvalidField
from .sequences import Sequences

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
        self._budget = MemoryBudget(
            config.memory_budget_bytes,
            config.memory_headroom,
            self._cache,
            self._models,
            self._live,
        )
        self._faults = Faults()
        self._sequences = Sequences(config, self._cache, self._budget, self._models, self._faults)
        self._admission = Admission(config, self._sequences, self._budget)
        self._stopping = False
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
                self._admission.admit(events)
                self._budget.note()
                self._outbox.post(events)
                if self._sequences.active:
                    self._outbox.post(self._sequences.step_all())
                now = time.monotonic()
                if not self._sequences.active or now - self._swept_at >= 1.0:
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
            queued=len(self._admission.waiting),
            active_sequences=len(self._sequences.active),
            models_resident=tuple(m.name for m in self._models.resident()),
        )

    def _take_commands(self) -> list[_Command]:
        commands = []
        if not self._sequences.active and not self._admission.waiting:
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
            self._sequences.cancel(command.sink, events)
            self._admission.cancel(command.sink, events)
            return
        if isinstance(command, _Pause):
            self._admission.set_paused(command.owner, command.paused)
            return
        if isinstance(command, _Reconfigure):
            # Between rounds: running sequences go on as they were; the new aliases, limits
            # and budgets apply from the next request on.
            self._config = self._sequences.config = self._admission.config = command.config
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
                (command.sink, cancelled_unstarted(req, command.received_at, len(tokens or ())))
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
            self._sequences.cancel_model(req.model, events)
            self._admission.cancel_model(req.model, events)
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
            active_sequences=len(self._sequences.active),
            queued=len(self._admission.waiting),
            decode_steps=self._sequences.decode_steps,
            tokens_generated=self._sequences.tokens_generated,
            prompt_tokens_processed=self._sequences.prompt_tokens_processed,
            sequences_preempted=self._admission.preempted,
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
        self._sequences.close_model(loaded.name)

    def _persist_cache(self) -> None:
        if not self._config.cache_persist or not len(self._cache) or not self._store.usable():
            return
        identities = {m.name: m.identity for m in self._models.resident()}
        try:
            n = self._store.save(self._cache, identities, self._config.cache_persist_max_bytes)
            log.info("cache_saved", entries=n, dir=str(self._store.folder))
        except Exception as exc:  # a full disk is a RuntimeError from mlx: never fail shutdown
            log.error("cache_save_failed", dir=str(self._store.folder), error=repr(exc))

    def _live(self) -> dict[str, tuple[int, int]]:
        """(KV, scratch) bytes set aside for the running sequences, by model, and the
        states paused ones hold out of any batch."""
        live = self._sequences.live()
        for name, nbytes in self._admission.held():
            had = live.get(name, (0, 0))
            live[name] = (had[0] + nbytes, had[1])
        return live

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
        self._admission.enqueue(req, sink, received_at, loaded, tokens, warm)

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

    def _end_all(self, code: str, message: str) -> None:
        events: list[Event] = []
        self._sequences.end_all(code, message, events)
        self._admission.end_all(code, message, events)
        for sink, req in self._tokenizing.items():
            events.append((sink, Error(id=req.id, code=code, message=message)))
        self._tokenizing.clear()
        self._tokenizer.stop()
        self._outbox.post(events)
