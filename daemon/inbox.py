"""The worker's inbox: the commands the event loop (and the tokenizer thread) send the
worker, and the sinks the loop has cancelled.

The loop's calls on ``Worker`` (``submit``, ``cancel``, ``pause``, ...) each put one
command here; the worker drains the inbox between rounds, so a cancel takes effect before
the cancelled sequence's next step, and a burst of requests is seen as one. A cancel also
marks its sink at once (``cancelled``), so that requests still queued, in the inbox or for
the tokenizer thread, are skipped without waiting for the cancel's turn.

These commands are the worker's own, not protocol messages: ``Cancel`` here names a sink,
not a request id.

Threading: ``put`` and ``cancel`` from any thread (the event loop's; the tokenizer thread
puts its ``Tokenized`` results); ``wait`` and ``drain`` on the worker thread. No locks: the
queue is a thread-safe ``SimpleQueue``, and ``cancelled`` a set only added to (loop), read
(tokenizer) and removed from (worker), each one atomic operation.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any

from mlxd.protocol import ClearCache, Generate, GetStats, ListModels, Load, Unload, Warm

from .config import Config

WorkerRequest = Generate | Warm | Load | Unload | ListModels | ClearCache | GetStats


@dataclass(frozen=True, slots=True)
class Submit:
    request: WorkerRequest
    sink: Any
    received_at: float


@dataclass(frozen=True, slots=True)
class Cancel:
    sink: Any


@dataclass(frozen=True, slots=True)
class Preload:
    model: str


@dataclass(frozen=True, slots=True)
class Reconfigure:
    config: Config


@dataclass(frozen=True, slots=True)
class Pause:
    owner: Any
    paused: bool


class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Tokenized:
    """A prompt tokenized on the tokenizer thread: its ``tokens``, or the ``error`` that
    refused it; neither when it was cancelled before its turn came."""

    request: Generate
    sink: Any
    received_at: float
    warm: Warm | None
    tokens: list[int] | None
    error: Exception | None


Command = Submit | Cancel | Preload | Reconfigure | Pause | Stop | Tokenized


class Inbox:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Command] = queue.SimpleQueue()
        # Sinks the loop cancelled (added on its thread, at once): the tokenizer thread and
        # the worker skip their requests still in a queue, not only when the cancel's turn
        # in the inbox comes. The worker removes each once nothing more can see it.
        self.cancelled: set[Any] = set()

    def put(self, command: Command) -> None:
        self._queue.put(command)

    def cancel(self, sink: Any) -> None:
        self.cancelled.add(sink)
        self._queue.put(Cancel(sink))

    def wait(self, timeout: float | None) -> Command | None:
        """The next command, waiting ``timeout`` seconds at most (None: for ever); None if
        none came."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[Command]:
        """Every command in the inbox now, without waiting."""
        commands = []
        # The worker is the only reader: an inbox that is not empty has a command for it
        # (and a round with none, the usual decode round, raises no exception).
        while not self._queue.empty():
            commands.append(self._queue.get_nowait())
        return commands
