"""One model across several Macs: every rank's worker runs the same rounds on rank 0's
inputs, in lockstep, over MLX's distributed backend (``mlx.launch``; ring over TCP, or
JACCL over Thunderbolt).

The model is sharded across the ranks (mlx-lm's ``sharded_load``: tensor parallel), so
each forward pass is a collective: every rank must run the same passes, in the same order,
on the same inputs, and hold the same KV states (each its share of them). mlxd gets that
by construction: each rank runs the same ``Worker`` code, and what could make two ranks'
workers decide differently is decided on rank 0 alone and broadcast at the start of each
round (``Round``):

- the commands the round takes (requests, cancels, pauses, preloads, the stop), in their
  order, each request's sink named by a number the followers map to a stand-in sink;
- the round's clock (wall and monotonic), which every decision that reads the time
  (background aging, keep-alive, pins) reads instead of its own (daemon/clock.py);
- rank 0's digest of its worker's state after the last round, which each follower checks
  against its own (``Diverged``: it stops rather than serve on out of step).

The rest is a function of those: the same tokens (prompts are tokenized on the worker, not
on a thread of their own whose timing differs), the same byte accounting (tensor
parallelism splits heads evenly: every rank's share of a state is the same size), the
same cache lookups and evictions, and the same sampled tokens (the logits after the
collective are the same on every rank; the random state is seeded the same). A
``Round`` is sent as two ``all_sum``s (its length, then its bytes), as mlx-lm's server
shares its requests. Rank 0 sends one at least every ``HEARTBEAT_S`` even when idle, so a
follower that hears nothing for the stall timeout knows rank 0 is gone.

Threading: ``Lockstep`` on the worker thread (its ``share`` is the round's first
collective); ``agree`` also at start-up on the main thread, before the worker starts.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Union

import mlx.core as mx
import msgspec
from mlx_lm.generate import generation_stream

from mlxd.protocol import Done, Error, Request

from . import clock
from .inbox import Cancel, Command, Pause, Preload, Stop, Submit

HEARTBEAT_S = 1.0
"""The longest rank 0 leaves its followers without a round while it is idle."""


class _Wire(msgspec.Struct, tag_field="kind", array_like=True):
    pass


class WireSubmit(_Wire, tag="submit"):
    sink: int
    owner: int | None
    request: bytes  # the protocol request, as MessagePack
    received_at: float


class WireCancel(_Wire, tag="cancel"):
    sink: int


class WirePause(_Wire, tag="pause"):
    owner: int
    paused: bool


class WirePreload(_Wire, tag="preload"):
    model: str


class WireStop(_Wire, tag="stop"):
    pass


WireCommand = Union[WireSubmit, WireCancel, WirePause, WirePreload, WireStop]  # noqa: UP007


class Round(msgspec.Struct, array_like=True):
    commands: list[WireCommand]
    wall: float
    mono: float
    state: str = ""
    """Rank 0's digest of its worker's state at the end of the last round (``Worker.digest``):
    a follower whose own differs has diverged, and stops at once rather than serve on."""


class Diverged(RuntimeError):
    """This follower's worker no longer matches rank 0's: its KV shares cannot be trusted."""


@dataclass(frozen=True)
class RemoteSink:
    """A follower's stand-in for one of rank 0's sinks: only its number matters (what the
    worker keys its sequences by; equal numbers are the same sink), and its connection's
    (``owner``, for pauses)."""

    id: int
    owner: int | None = field(default=None, compare=False)


_ENCODER = msgspec.msgpack.Encoder()
_ROUND = msgspec.msgpack.Decoder(Round)
_REQUEST = msgspec.msgpack.Decoder(Request)


class Lockstep:
    """A rank's end of the rounds: rank 0 leads (sends), the others follow (receive)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self._numbers = itertools.count(1)
        # Rank 0: the number of each sink with a request in flight, and of its connection.
        self._ids: dict[Any, int] = {}
        self.rounds = 0
        self.bytes_sent = 0
        """Bytes of rounds rank 0 has broadcast (for the benchmark)."""

    @property
    def leads(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ the round

    def share(self, commands: list[Command], state: str = "") -> list[Command]:
        """The round's commands and clock, the same on every rank: rank 0's (``commands``),
        which the followers receive in their place (theirs are always empty). ``state``:
        this rank's digest of the last round's end; a follower's must be rank 0's."""
        if self.leads:
            pairs = [(c, w) for c in commands if (w := self._wire(c)) is not None]
            got = Round([w for _, w in pairs], time.time(), time.perf_counter(), state)
            payload = _ENCODER.encode(got)
            self._broadcast(payload)
            self.bytes_sent += len(payload)
            # What the followers cannot be told, rank 0 does not do either.
            shared = [c for c, _ in pairs]
        else:
            got = _ROUND.decode(self._broadcast(None))
            if got.state != state:
                raise Diverged(
                    f"rank {self.rank}'s worker diverged from rank 0's (after round "
                    f"{self.rounds}: {state} here, {got.state} there)"
                )
            shared = [self._command(w) for w in got.commands]
        clock.set_round(got.wall, got.mono)
        self.rounds += 1
        return shared

    def _broadcast(self, payload: bytes | None) -> bytes:
        # On mlx-lm's generation stream, behind the forward passes still in flight there
        # (its generators evaluate the next step ahead): collectives must run in the same
        # order on every rank, and two streams would interleave them as they please.
        stream = generation_stream
        size = mx.array(len(payload) if payload is not None else 0, dtype=mx.int64)
        size = mx.distributed.all_sum(size, group=self.group, stream=stream).item()
        data = (
            mx.array(memoryview(payload), dtype=mx.uint8)
            if payload is not None
            else mx.zeros(size, dtype=mx.uint8)
        )
        if not size:
            return b""
        data = mx.distributed.all_sum(data, group=self.group, stream=stream)
        return bytes(memoryview(data.astype(mx.uint8)))

    # ------------------------------------------------------------------ commands on the wire

    def ended(self, events: list[tuple[Any, Any]]) -> None:
        """Forget the numbers of the sinks whose requests these events end."""
        if self.leads:
            for sink, message in events:
                if isinstance(message, Done | Error):
                    self._ids.pop(sink, None)

    def _number(self, obj: Any) -> int | None:
        if obj is None:
            return None
        number = self._ids.get(obj)
        if number is None:
            number = self._ids[obj] = next(self._numbers)
        return number

    def _owner(self, owner: Any) -> int | None:
        """A connection's number: its ``id`` (a connection outlives its requests; two alive
        at once never share one)."""
        return None if owner is None else id(owner)

    def _wire(self, command: Command) -> WireCommand | None:
        if isinstance(command, Submit):
            sink = self._number(command.sink)
            assert sink is not None
            owner = self._owner(getattr(command.sink, "owner", None))
            request = _ENCODER.encode(command.request)
            return WireSubmit(sink, owner, request, command.received_at)
        if isinstance(command, Cancel):
            number = self._ids.get(command.sink)
            return None if number is None else WireCancel(number)
        if isinstance(command, Pause):
            owner = self._owner(command.owner)
            assert owner is not None
            return WirePause(owner, command.paused)
        if isinstance(command, Preload):
            return WirePreload(command.model)
        if isinstance(command, Stop):
            return WireStop()
        return None  # a reload: refused in distributed mode (the server never sends one)

    def _command(self, wire: WireCommand) -> Command:
        if isinstance(wire, WireSubmit):
            sink = RemoteSink(wire.sink, wire.owner)
            return Submit(_REQUEST.decode(wire.request), sink, wire.received_at)
        if isinstance(wire, WireCancel):
            return Cancel(RemoteSink(wire.sink))
        if isinstance(wire, WirePause):
            return Pause(wire.owner, wire.paused)
        if isinstance(wire, WirePreload):
            return Preload(wire.model)
        return Stop()

    # ------------------------------------------------------------------ agreeing

    def agree(self, value: bytes) -> bytes:
        """Rank 0's ``value`` on every rank (for what each measures on its own but all must
        decide by alike: a model's transient bytes, say)."""
        return self._broadcast(value if self.leads else None)


def fingerprint(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def check_same(lockstep: Lockstep, mine: str, what: str) -> str | None:
    """Whether every rank has rank 0's ``mine`` (a fingerprint): None if they do, else the
    problem, on every rank (all must refuse to start together)."""
    theirs = lockstep.agree(mine.encode()).decode()
    differs = mx.array(int(theirs != mine), dtype=mx.int32)
    total = mx.distributed.all_sum(differs, group=lockstep.group, stream=generation_stream).item()
    if not total:
        return None
    if theirs != mine:
        return f"rank {lockstep.rank}'s {what} differs from rank 0's"
    return f"{total} follower rank(s) have a {what} that differs from rank 0's"
