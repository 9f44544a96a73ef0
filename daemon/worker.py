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
    Queued,
    Unload,
    Warm,
    errors,
)

from .cache import PromptCache
from .config import Config
from .endings import cancelled_before_start, cancelled_unstarted
from .faults import Faults, InjectedCrash
from .memory import Footprint, MemoryBudget, generator_bytes, give_back_buffers
from .models import LoadedModel, ModelError, ModelRegistry, RequestError
from .outbox import Event, LoopOutbox
from .pausing import Held, can_pause
from .persist import PromptCacheStore
from .prompts import INLINE_CHARS, TokenizerThread, text_chars
from .rendering import FIM_TOKENS, prompt_tokens, refuse_oversized
from .sampling import InvalidField, make_sampling
from .sequences import Sequence, Sequences

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
    paused: Sequence | None = None
    """A sequence that left its batch while its owner was paused, to resume as it was."""
    held: Held | None = None

    def lane(self, now: float, aging_s: float) -> int:
        """0 goes first: interactive, or background that has waited long enough."""
        waited = now - self.received_at
        return 0 if self.request.priority == "interactive" or waited >= aging_s else 1


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
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._paused: set[Any] = set()  # owners whose replies pile up unread
        self._preempted = 0
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
                self._admit(events)
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
            queued=len(self._waiting),
            active_sequences=len(self._sequences.active),
            models_resident=tuple(m.name for m in self._models.resident()),
        )

    def _take_commands(self) -> list[_Command]:
        commands = []
        if not self._sequences.active and not self._waiting:
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
            for waiting in [w for w in self._waiting if w.sink is command.sink]:
                self._waiting.remove(waiting)
                waiting.model.active -= 1
                events.append((waiting.sink, cancelled_before_start(waiting)))
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
            self._config = self._sequences.config = command.config
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
            for waiting in [w for w in self._waiting if w.model.name == req.model]:
                self._waiting.remove(waiting)
                waiting.model.active -= 1
                events.append((waiting.sink, cancelled_before_start(waiting)))
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
            queued=len(self._waiting),
            decode_steps=self._sequences.decode_steps,
            tokens_generated=self._sequences.tokens_generated,
            prompt_tokens_processed=self._sequences.prompt_tokens_processed,
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
        self._sequences.close_model(loaded.name)

    def _runs_solo(self, loaded: LoadedModel, waiting: _Waiting | None = None) -> bool:
        """Whether a new sequence of ``loaded`` (``waiting``, if it is still in the queue)
        would run alone: nothing else of its model runs or waits."""
        others = any(
            w.model is loaded and w is not waiting and _owner(w.sink) not in self._paused
            for w in self._waiting
        )
        return self._sequences.running(loaded) == 0 and not others

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
        for waiting in self._waiting:
            if waiting.held is not None:  # a paused sequence's state, out of any batch
                had = live.get(waiting.model.name, (0, 0))
                live[waiting.model.name] = (had[0] + waiting.held.nbytes, had[1])
        return live

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
        batch = self._sequences.joinable(loaded)
        if batch is None:
            batched = not self._runs_solo(loaded, waiting)
            return sum(generator_bytes(loaded, [footprint], 1, batched=batched))
        added = self._sequences.generator_bytes(batch, footprint)
        return sum(added) - sum(self._sequences.generator_bytes(batch))

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
        free = max(0, self._config.max_batch_size - self._sequences.running(loaded))
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
        return self._sequences.running(loaded) >= self._config.max_batch_size

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
                        self._sequences.begin(waiting, self._runs_solo(waiting.model))
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
        for seq in [s for s in self._sequences.active.values() if _owner(s.sink) in self._paused]:
            if seq.first_token_at is None or seq.warm is not None or seq.origin is None:
                continue
            if not can_pause(seq.model):
                continue
            waiting = seq.origin
            held = self._sequences.pause(seq, waiting.sampler)
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
        solo = self._runs_solo(waiting.model)
        self._sequences.resume(seq, held, waiting.sampler, waiting.processors, solo)
        waiting.paused = waiting.held = None

    def _room_for(self, waiting: _Waiting, lane: int, events: list[Event]) -> bool:
        """Whether the budget can set ``waiting``'s KV aside now (freeing cache entries and
        idle models if need be; background work that has to share takes neither the cached
        states interactive work comes back to nor a model). If not, it waits for running
        sequences to end; with none running, nothing will free up, so it is refused."""
        needed = self._needed(waiting)
        if waiting.held is not None:
            # Already counted (``_live``); it moves into the batch's arrays as it joins.
            needed = max(0, needed - waiting.held.nbytes)
        background = lane == 1 and bool(self._sequences.active)
        if self._budget.make_room(needed, keep=waiting.model, for_background=background):
            return True
        if not self._sequences.active:
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

    def _end_all(self, code: str, message: str) -> None:
        events: list[Event] = []
        self._sequences.end_all(code, message, events)
        while self._waiting:
            waiting = self._waiting.popleft()
            waiting.model.active -= 1
            events.append((waiting.sink, Error(id=waiting.request.id, code=code, message=message)))
        for sink, req in self._tokenizing.items():
            events.append((sink, Error(id=req.id, code=code, message=message)))
        self._tokenizing.clear()
        self._tokenizer.stop()
        self._outbox.post(events)
