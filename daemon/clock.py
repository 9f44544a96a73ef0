"""The clock the worker's decisions read: when a background request has waited long
enough, when a model's keep-alive or a cache entry's pin runs out.

Alone, it is the process's own clocks. In distributed mode (daemon/lockstep.py) every
rank's worker must decide alike, so each round's decisions read the time rank 0 sent with
the round, on every rank (rank 0 included). What is only reported (a request's timings)
reads the real clocks.

Threading: ``set_round`` on the worker thread, between rounds; the readers on the worker
thread (a tuple, replaced whole: one atomic read elsewhere).
"""

from __future__ import annotations

import time

_round: tuple[float, float] | None = None


def set_round(wall_s: float, mono_s: float) -> None:
    global _round
    _round = (wall_s, mono_s)


def wall() -> float:
    """Seconds since the epoch (``time.time``), or the round's."""
    r = _round
    return time.time() if r is None else r[0]


def mono() -> float:
    """``time.perf_counter``, or the round's (rank 0's, which requests' arrival times use)."""
    r = _round
    return time.perf_counter() if r is None else r[1]
