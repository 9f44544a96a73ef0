"""Fault injection, for tests that must prove the daemon survives its own failures.

``MLXD_FAULTS`` holds comma-separated faults, each armed once:

- ``step_error:MODEL@N``: the Nth decode step of MODEL's generators raises ``RuntimeError``
  (the requests in that step must fail alone; the worker must go on);
- ``worker_crash@N``: the worker thread dies at its Nth round (the daemon must fail what
  is in flight with ``worker_unavailable`` and exit non-zero);
- ``worker_stall@N``: the worker's Nth round takes 3 s more (``health`` must still answer
  at once, from the event loop, and show the worker busy);
- ``drop_command@N``: distributed mode, a follower: the Nth round's first command is not
  handled (the follower must find it has diverged, and stop at once);
- ``save_stall@N``: a prompt-cache save logs ``fault_save_stall`` and sleeps 60 s before
  writing its Nth file (a test kills the daemon there: the last save must survive).

Unset in production: ``Faults`` is then falsy, and the worker skips every check.

Threading: worker thread only.
"""

from __future__ import annotations

import os


class InjectedCrash(BaseException):
    """Not an ``Exception``: it must escape the per-request handlers, as a real crash would."""


class Faults:
    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get("MLXD_FAULTS", "") if spec is None else spec
        self._armed: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, at = item.partition("@")
            self._armed[name] = int(at or 1)

    def __bool__(self) -> bool:
        return bool(self._armed)

    def hit(self, name: str) -> bool:
        """Count one occurrence of ``name``; True exactly at its armed occurrence."""
        if name not in self._armed:
            return False
        self._counts[name] = count = self._counts.get(name, 0) + 1
        return count == self._armed[name]
