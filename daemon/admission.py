"""Admission: the wait queue, and which waiting request starts when.

A generate whose model is loaded and whose prompt is tokenized joins the wait queue
(``enqueue``), unless it could not fit the memory budget even alone or the queue is full.
Each round, once the whole inbox is read, ``admit`` starts waiting requests in lane order
(``interactive`` before ``background``, a background request aged past
``background_aging_s`` counting as interactive), each when its batch has room and the
memory budget (daemon/memory.py) can set aside its KV; those still waiting are told their
place (``queued``).

Paused owners: a connection whose replies pile up unread is paused by the loop
(``Worker.pause``/``resume``); its running sequences leave their batches with their state
and go on token-exact once it reads (daemon/pausing.py), and its waiting requests neither
start nor count toward ``max_queued``.

``Admission`` owns the wait queue (``waiting``), the paused owners (``paused``) and the
count of preempted sequences. It starts, pauses and resumes sequences through
``Sequences`` (daemon/sequences.py), whose running sequences it reads. Others read
``waiting``; only ``Admission`` changes it.

Threading: worker thread only.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from mlxd.protocol import Error, Generate, Queued, Warm, errors

from . import clock
from .charges import added_bytes
from .config import Config
from .constraints import constraint_for
from .endings import cancelled_before_start
from .memory import Footprint, MemoryBudget, generator_bytes
from .models import LoadedModel, RequestError
from .outbox import Event
from .pausing import Held, can_pause
from .running import Sequence
from .sampling import make_sampling
from .sequences import Sequences
from .speculative import Speculation, speculation_for
from .tools import forced_constraint, forced_format, tool_ban

# One logger for all the worker thread does.
log = structlog.get_logger("mlxd.worker")


def _owner(sink: Any) -> Any:
    """The key ``pause``/``resume`` name a sink by (its connection); None: never paused."""
    return getattr(sink, "owner", None)


@dataclass(eq=False)
class Waiting:
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
    speculation: Speculation | None = None
    """How it will speculate if it starts alone (daemon/speculative.py)."""

    def lane(self, now: float, aging_s: float) -> int:
        """0 goes first: interactive, or background that has waited long enough."""
        waited = now - self.received_at
        return 0 if self.request.priority == "interactive" or waited >= aging_s else 1


class Admission:
    """The wait queue (``waiting``, in arrival order) and the paused owners."""

    def __init__(self, config: Config, sequences: Sequences, budget: MemoryBudget) -> None:
        self.config = config
        """Replaced by the worker on a reload, between rounds."""
        self._sequences = sequences
        self._budget = budget
        self.waiting: collections.deque[Waiting] = collections.deque()
        self.paused: set[Any] = set()  # owners whose replies pile up unread
        self.preempted = 0

    def set_paused(self, owner: Any, paused: bool) -> None:
        if paused:
            self.paused.add(owner)
        else:
            self.paused.discard(owner)

    def enqueue(
        self,
        req: Generate,
        sink: Any,
        received_at: float,
        loaded: LoadedModel,
        tokens: list[int],
        warm: Warm | None,
    ) -> None:
        """Queue a generate with its prompt's ``tokens``, or refuse it: with
        ``insufficient_memory`` if it could not fit the budget even alone, with
        ``overloaded`` if the queue is full."""
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
        if (ban := tool_ban(req, loaded.tokenizer, loaded.vocab_size)) is not None:
            processors = [*processors, ban]
        constraint = constraint_for(req.format, loaded)  # compiled here: refused before a place
        if (tool_format := forced_format(req)) is not None:
            constraint = forced_constraint(*tool_format, loaded)
        if constraint is not None:
            processors = [*processors, constraint]  # last: nothing lifts its -inf
        speculation = speculation_for(
            req, loaded, constrained=constraint is not None, warm=warm is not None
        )
        free = max(0, self.config.max_batch_size - self._sequences.running(loaded))
        waiting = self.queued()
        if waiting >= self.config.max_queued + free:
            raise RequestError(
                errors.OVERLOADED,
                f"{waiting} requests are already waiting (max_queued)",
            )
        loaded.active += 1  # reserved: a model with waiting work is not unloaded
        # Admitted by the run loop once the whole inbox is read, so that a burst of
        # requests is seen as one and batched from its first step.
        entry = Waiting(
            req, sink, received_at, loaded, tokens, sampler, processors, footprint, warm
        )
        entry.speculation = speculation
        self.waiting.append(entry)

    def queued(self) -> int:
        """Requests waiting for a place, less a paused owner's: a client that does not read
        its replies cannot fill the queue for the others (its own requests are bounded by
        ``max_requests_per_connection``)."""
        if not self.paused:
            return len(self.waiting)
        return sum(1 for w in self.waiting if _owner(w.sink) not in self.paused)

    def held(self) -> Iterator[tuple[str, int]]:
        """(model name, bytes) of each state a paused sequence holds out of any batch."""
        for waiting in self.waiting:
            if waiting.held is not None:
                yield waiting.model.name, waiting.held.nbytes

    # ------------------------------------------------------------------ a round's admission

    def admit(self, events: list[Event]) -> None:
        """Start waiting requests, in lane order, where their model's batch has room and
        the budget can set their KV aside; tell the others their place when it changed. A
        paused owner's requests wait, ahead of no one: they neither start nor get a place."""
        if not self.waiting and not self.paused:
            return
        if self.paused:
            self._pause_running(events)
        position = 0
        now = clock.mono()
        aging = self.config.background_aging_s
        # Once a request waits for memory, lower lanes wait too: they would take the room
        # it waits for.
        held_below: int | None = None
        # sorted() is stable: arrival order within a lane.
        for waiting in sorted(self.waiting, key=lambda w: w.lane(now, aging)):
            if self.paused and _owner(waiting.sink) in self.paused:
                continue
            lane = waiting.lane(now, aging)
            admit = not self._batch_full(waiting.model) and (
                held_below is None or lane <= held_below
            )
            if admit and self._room_for(waiting, lane, events):
                self.waiting.remove(waiting)
                waiting.model.active -= 1
                try:
                    if waiting.held is not None:
                        self._resume(waiting, events)
                    else:
                        solo = self._runs_solo(waiting.model)
                        self._sequences.begin(waiting, solo, events)
                except Exception as exc:
                    log.exception("request_failed", request_id=waiting.request.id)
                    error = Error(
                        id=waiting.request.id, code=errors.INTERNAL_ERROR, message=repr(exc)
                    )
                    events.append((waiting.sink, error))
                continue
            if waiting not in self.waiting:
                continue  # refused by _room_for
            if admit and held_below is None:
                held_below = lane  # it waits for memory
            if waiting.position != position:
                waiting.position = position
                events.append((waiting.sink, Queued(id=waiting.request.id, position=position)))
            position += 1

    def _batch_full(self, loaded: LoadedModel) -> bool:
        return self._sequences.running(loaded) >= self.config.max_batch_size

    def _runs_solo(self, loaded: LoadedModel, waiting: Waiting | None = None) -> bool:
        """Whether a new sequence of ``loaded`` (``waiting``, if it is still in the queue)
        would run alone: nothing else of its model runs or waits."""
        others = any(
            w.model is loaded and w is not waiting and _owner(w.sink) not in self.paused
            for w in self.waiting
        )
        return self._sequences.running(loaded) == 0 and not others

    def _footprint(self, loaded: LoadedModel, prompt: list[int], max_tokens: int) -> Footprint:
        span = len(prompt) + max_tokens
        if loaded.context_length:
            span = min(span, loaded.context_length)
        # At admission the cached share of the prompt is not known yet: the whole of it.
        prefill = min(self.config.prefill_step_size, len(prompt))
        return Footprint(span=span, prefill=prefill, context=len(prompt))

    def _needed(self, waiting: Waiting) -> int:
        """Bytes that starting ``waiting`` adds: its own KV and scratch, and the padding it
        gives the batch it joins (or all of a generator's, when it starts one)."""
        solo = self._runs_solo(waiting.model, waiting)
        return added_bytes(self._sequences, waiting.model, waiting.footprint, solo)

    def _room_for(self, waiting: Waiting, lane: int, events: list[Event]) -> bool:
        """Whether the budget can set ``waiting``'s KV aside now (freeing cache entries and
        idle models if need be; background work that has to share takes neither the cached
        states interactive work comes back to nor a model). If not, it waits for running
        sequences to end; with none running, nothing will free up, so it is refused."""
        needed = self._needed(waiting)
        if waiting.held is not None:
            # Already counted as live (``held``); it moves into the batch's arrays as it joins.
            needed = max(0, needed - waiting.held.nbytes)
        background = lane == 1 and bool(self._sequences.active)
        if self._budget.make_room(needed, keep=waiting.model, for_background=background):
            return True
        if not self._sequences.active:
            self.waiting.remove(waiting)
            waiting.model.active -= 1
            message = (
                f"{needed} bytes of KV state and transient buffers do not fit the memory budget of "
                f"{self._budget.usable} usable beside the resident weights and pinned cache entries"
            )
            error = Error(id=waiting.request.id, code=errors.INSUFFICIENT_MEMORY, message=message)
            events.append((waiting.sink, error))
        return False

    # ------------------------------------------------------------------ paused owners

    def _pause_running(self, events: list[Event]) -> None:
        """Paused owners' running sequences leave their batches and wait, state kept (see
        daemon/pausing.py). One still prefilling leaves after its first token; a warm-up
        ends with its prefill anyway."""
        for seq in [s for s in self._sequences.active.values() if _owner(s.sink) in self.paused]:
            if seq.first_token_at is None or seq.warm is not None or seq.origin is None:
                continue
            if not can_pause(seq.model):
                continue
            waiting = seq.origin
            held = self._sequences.pause(seq, waiting.sampler)
            if held is None:
                seq.model.active -= 1
                message = "the sequence's state could not be kept while it was paused"
                error = Error(id=seq.request.id, code=errors.INTERNAL_ERROR, message=message)
                events.append((seq.sink, error))
                continue
            # Back in the queue in arrival order; the model stays reserved (``active``).
            waiting.paused, waiting.held, waiting.position = seq, held, -1
            waiting.footprint = Footprint(
                span=seq.span, prefill=len(held.feed), context=len(held.tokens) + len(held.feed)
            )
            at = next(
                (i for i, w in enumerate(self.waiting) if w.received_at > waiting.received_at),
                len(self.waiting),
            )
            self.waiting.insert(at, waiting)
            self.preempted += 1

    def _resume(self, waiting: Waiting, events: list[Event]) -> None:
        """Put a paused sequence back into a batch: it goes on where it was."""
        seq, held = waiting.paused, waiting.held
        assert seq is not None and held is not None
        solo = self._runs_solo(waiting.model)
        self._sequences.resume(seq, held, waiting.sampler, waiting.processors, solo, events)
        waiting.paused = waiting.held = None

    # ------------------------------------------------------------------ ends

    def cancel(self, sink: Any, events: list[Event]) -> None:
        """``sink``'s waiting request, if any, ends with ``done`` (``cancelled``)."""
        self._cancel([w for w in self.waiting if w.sink is sink], events)

    def cancel_model(self, name: str, events: list[Event]) -> None:
        """Model ``name``'s waiting requests end with ``done`` (``cancelled``)."""
        self._cancel([w for w in self.waiting if w.model.name == name], events)

    def _cancel(self, which: list[Waiting], events: list[Event]) -> None:
        for waiting in which:
            self.waiting.remove(waiting)
            waiting.model.active -= 1
            events.append((waiting.sink, cancelled_before_start(waiting)))

    def end_all(self, code: str, message: str, events: list[Event]) -> None:
        """Every waiting request ends with an ``error``."""
        while self.waiting:
            waiting = self.waiting.popleft()
            waiting.model.active -= 1
            events.append((waiting.sink, Error(id=waiting.request.id, code=code, message=message)))
