"""The MLX worker: the one thread that touches MLX, and the round it runs.

The event loop hands commands to ``Worker`` through a thread-safe inbox (``submit``,
``cancel``, ``stop``: daemon/inbox.py); the worker thread loads models, prefills and
decodes, and posts protocol messages back through ``LoopOutbox`` (daemon/outbox.py), one
loop wake-up per decode round.

A round: the commands that came in (each handled here: cancels, pauses, reloads; control
requests through daemon/control.py; generates through daemon/intake.py into the wait
queue), then admission (daemon/admission.py), the memory budget's note of the peak, the
events so far posted, then one step of every generator with work (daemon/sequences.py),
its events posted, and the keep-alive sweep.
Between rounds the inbox is drained, so a cancel takes effect before the cancelled
sequence's next step.

Model loads run here too (MLX streams are thread-local), inside a round: the load
reports its progress as it reads the weights, and each report is posted to the requesting
sink at once (not with the round's events, which the load holds up) and refreshes the
snapshot's ``progress_at``, so the stall watchdog sees a long load moving.

Threading: ``start``, ``submit``, ``preload``, ``cancel``, ``pause``, ``resume``,
``reconfigure``, ``stop`` and ``alive`` are for the event loop thread (``join`` for any
thread but the worker's), which also reads ``snapshot``; every other method runs on the
worker thread. No locks: the inbox and outbox are thread-safe queues, and ``snapshot`` is
replaced whole, one atomic attribute store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import structlog

from mlxd.protocol import Error, Generate, Progress, Warm, errors

from .admission import Admission
from .cache import PromptCache
from .charges import live_bytes
from .config import Config
from .control import Control, WorkerStats
from .faults import Faults, InjectedCrash
from .inbox import (
    Cancel,
    Command,
    Inbox,
    Pause,
    Preload,
    Reconfigure,
    Stop,
    Submit,
    Tokenized,
    WorkerRequest,
)
from .intake import Intake
from .lockstep import HEARTBEAT_S, Lockstep
from .memory import MemoryBudget, give_back_buffers
from .models import LoadedModel, ModelError, ModelRegistry, RequestError
from .outbox import Event, LoopOutbox
from .persist import PromptCacheStore
from .profiling import PROFILE
from .rendering import FIM_TOKENS
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
        lockstep: Lockstep | None = None,
    ) -> None:
        self._config = config
        self._lockstep = lockstep
        """Distributed mode: this rank's end of the rounds (daemon/lockstep.py)."""
        self._outbox = outbox
        self._on_death = on_death
        self._inbox = Inbox()
        self._thread = threading.Thread(target=self._run, name="mlxd-worker", daemon=True)
        self._cache = PromptCache(
            config.cache_max_bytes,
            config.cache_max_entries,
            config.cache_kv_bits,
            config.cache_kv_group_size,
        )
        self._restored: set[str] = set()
        self._models = ModelRegistry(
            config,
            on_load=self._model_loaded,
            on_unload=self._model_unloaded,
            make_room=lambda needed: self._budget.make_room(needed),
            agree=lockstep.agree if lockstep is not None else None,
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
        self._intake = Intake(
            config, self._cache, self._models, self._admission, self._inbox, self._load_progress
        )
        self._control = Control(
            self._models,
            self._cache,
            self._budget,
            self._sequences,
            self._admission,
            self._load_progress,
        )
        self._stopping = False
        self._store = PromptCacheStore(config.cache_dir(), config.socket_path, self._faults)
        self.snapshot = WorkerSnapshot(time.monotonic(), True, 0, 0, ())
        self._resident_names: tuple[str, ...] = ()
        self._noted = -1
        """``Sequences.changes`` when the budget last noted its peak."""
        self._swept_at = 0.0

    # ------------------------------------------------------------------ event loop thread

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: WorkerRequest, sink: Any, received_at: float) -> None:
        self._inbox.put(Submit(request, sink, received_at))

    def preload(self, model: str) -> None:
        """Load ``model`` ahead of its first request; a failure is logged, not fatal."""
        self._inbox.put(Preload(model))

    def cancel(self, sink: Any) -> None:
        if self._lockstep is not None:
            # Not marked at once: every rank must see the cancel in the same round.
            self._inbox.put(Cancel(sink))
            return
        self._inbox.cancel(sink)

    def pause(self, owner: Any) -> None:
        """``owner``'s replies pile up unread: its sequences leave their batches (keeping
        their state) and its waiting requests wait, until ``resume``."""
        self._inbox.put(Pause(owner, True))

    def resume(self, owner: Any) -> None:
        self._inbox.put(Pause(owner, False))

    def reconfigure(self, config: Config) -> None:
        """Use ``config`` (a SIGHUP reload) for every command queued after this one."""
        self._inbox.put(Reconfigure(config))

    def stop(self) -> None:
        self._inbox.put(Stop())

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
                if self._lockstep is not None:  # every rank: rank 0's commands and clock
                    commands = self._lockstep.share(commands, self._digest())
                    if self._faults and commands and self._faults.hit("drop_command"):
                        commands = commands[1:]
                if PROFILE is not None:
                    PROFILE.begin(len(self._sequences.active))
                self._publish(idle=False)
                if self._faults and self._faults.hit("worker_stall"):
                    time.sleep(3.0)  # as a long model load or a huge step would
                for command in commands:
                    self._handle(command, events)
                self._admission.admit(events)
                if commands or self._sequences.changes != self._noted:
                    # Only what commands or a change in the running set did can move the
                    # accounting (a decode round changes no charge): not summed every token.
                    self._budget.note()
                    self._noted = self._sequences.changes
                self._post(events)
                if self._sequences.active:
                    self._post(self._sequences.step_all())
                if PROFILE is not None:
                    PROFILE.end()
                now = time.monotonic()
                if not self._sequences.active or now - self._swept_at >= 1.0:
                    # Busy rounds check keep-alives once a second: an idle model is
                    # unloaded on time even while another model is generating.
                    self._models.sweep()
                    self._swept_at = now
            self._end_all(errors.SHUTTING_DOWN, "the daemon is shutting down")
            self._persist_cache()
            if self._lockstep is not None and self._lockstep.leads:
                log.info(
                    "rounds_shared", rounds=self._lockstep.rounds, bytes=self._lockstep.bytes_sent
                )
            if PROFILE is not None:
                PROFILE.write()
            mx.synchronize()  # no MLX work may outlive the thread that queued it
        except BaseException as exc:
            log.critical("worker_died", error=repr(exc), traceback=traceback.format_exc())
            self._on_death(exc)

    def _digest(self) -> str:
        """What every rank's worker must agree on between rounds (distributed mode): the
        running and waiting requests, the tokens generated, the prompt cache's entries
        and bytes, the resident models. Cheap: counts and ids, not states."""
        seqs = sorted((s.request.id, s.completion_tokens) for s in self._sequences.active.values())
        parts = (
            seqs,
            len(self._admission.waiting),
            self._sequences.tokens_generated,
            len(self._cache),
            self._cache.nbytes,
            self._resident_names,
        )
        return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()

    def _post(self, events: list[Event]) -> None:
        if self._lockstep is not None:
            self._lockstep.ended(events)
        self._outbox.post(events)

    def _publish(self, idle: bool) -> None:
        now = time.monotonic()
        self.snapshot = WorkerSnapshot(
            round_started=now,
            progress_at=now,
            idle=idle,
            queued=len(self._admission.waiting),
            active_sequences=len(self._sequences.active),
            models_resident=self._resident_names,
        )

    def _take_commands(self) -> list[Command]:
        commands: list[Command] = []
        if self._lockstep is not None and not self._lockstep.leads:
            return commands  # a follower's come from rank 0 (``share``)
        if not self._sequences.active and not self._admission.waiting:
            # Idle: sleep until a command comes or a model's keep-alive expires.
            self._publish(idle=True)
            timeout = self._models.next_expiry()
            if mx.get_cache_memory():
                # Give MLX's buffer cache back to the system once idle for a moment (not
                # between the keystrokes of a burst, which reuse it).
                timeout = IDLE_TRIM_S if timeout is None else min(timeout, IDLE_TRIM_S)
            if self._lockstep is not None:  # the followers hear from rank 0 even when idle
                timeout = HEARTBEAT_S if timeout is None else min(timeout, HEARTBEAT_S)
            command = self._inbox.wait(timeout)
            if command is None:
                give_back_buffers()
                return commands
            commands.append(command)
        commands.extend(self._inbox.drain())
        return commands

    def _handle(self, command: Command, events: list[Event]) -> None:
        if isinstance(command, Stop):
            self._stopping = True
            return
        if isinstance(command, Cancel):
            self._intake.cancel(command.sink)
            self._sequences.cancel(command.sink, events)
            self._admission.cancel(command.sink, events)
            return
        if isinstance(command, Pause):
            self._admission.set_paused(command.owner, command.paused)
            return
        if isinstance(command, Reconfigure):
            # Between rounds: running sequences go on as they were; the new aliases, limits
            # and budgets apply from the next request on.
            self._config = command.config
            self._sequences.config = self._admission.config = self._intake.config = command.config
            self._models.reconfigure(command.config)
            new = command.config
            self._cache.set_limits(
                new.cache_max_bytes,
                new.cache_max_entries,
                new.cache_kv_bits,
                new.cache_kv_group_size,
            )
            self._budget.limit = command.config.memory_budget_bytes
            self._budget.headroom = command.config.memory_headroom
            self._budget.bound_buffer_cache()
            return
        if isinstance(command, Preload):
            try:
                # The registry logs the load; no one to tell of its progress but the watchdog.
                self._models.get(command.model, on_progress=self._load_progress(None, 0))
            except ModelError as exc:
                log.error("preload_failed", model=command.model, code=exc.code, error=exc.message)
            return
        req = command.request
        cancelled = self._intake.cancelled_early(command)
        if cancelled is not None:
            events.append((command.sink, cancelled))
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

    def _serve(self, command: Submit | Tokenized, events: list[Event]) -> Any:
        """Serve one request; returns its reply, or None for a generation now queued (or
        being tokenized)."""
        if isinstance(command, Tokenized):
            self._intake.tokenized(command)
            return None
        req = command.request
        if isinstance(req, Generate):
            self._intake.start(req, command.sink, command.received_at)
            return None
        if isinstance(req, Warm):
            self._intake.warm(req, command.sink, command.received_at)
            return None
        return self._control.serve(req, command.sink, events)

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

    # ------------------------------------------------------------------ the prompt cache

    def _model_loaded(self, loaded: LoadedModel) -> None:
        self._resident_names = tuple(m.name for m in self._models.resident())
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
        self._resident_names = tuple(m.name for m in self._models.resident())
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
        live = live_bytes(self._sequences)
        for name, nbytes in self._admission.held():
            had = live.get(name, (0, 0))
            live[name] = (had[0] + nbytes, had[1])
        return live

    def _end_all(self, code: str, message: str) -> None:
        events: list[Event] = []
        self._sequences.end_all(code, message, events)
        self._admission.end_all(code, message, events)
        self._intake.end_all(code, message, events)
        self._post(events)
