"""The way back from the worker to the event loop: ``Event`` and ``LoopOutbox``.

Every module of the worker collects what it has to tell clients as events, (sink,
message) pairs, and the worker posts them through ``LoopOutbox``, one loop wake-up per
decode round however many sequences are running.

Threading: ``LoopOutbox.post`` from the worker thread; its drain runs on the event loop
thread (``call_soon_threadsafe``), which delivers each event.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

Event = tuple[Any, Any]
"""(sink, message): the sink is the loop's handle for one request, opaque to the worker."""


class LoopOutbox:
    """Carries events from the worker to the event loop, with one wake-up per batch.

    The worker appends, then schedules a drain only if none is pending; the loop clears the
    flag before draining, so an event appended during a drain is either drained by it or
    triggers the next one. ``deque`` appends and pops are atomic, so no lock is needed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[Any, Any], None]):
        self._loop = loop
        self._deliver = deliver
        self._events: collections.deque[Event] = collections.deque()
        self._scheduled = False

    def post(self, events: list[Event]) -> None:
        if not events:
            return
        self._events.extend(events)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        events = self._events
        while events:
            sink, message = events.popleft()
            self._deliver(sink, message)
