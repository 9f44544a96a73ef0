"""A per-round profile of the worker, for finding where a round's time goes.

Off unless ``MLXD_PROFILE_ROUNDS`` names a file: then every round that stepped a generator
is recorded (its wall time, the worker thread's CPU time, the forward passes it ran, the
time inside the generators' ``next``, the tokens it produced), and on shutdown the rounds
and a summary are written there as JSON. bench/concurrency.py reads it for its profile
table. Off, it costs one ``None`` check per round and per generator step.

What the summary means:

- ``passes_per_round``: forward passes a round ran. A ``BatchGenerator`` step is one pass
  for its decoding sequences plus one for the prompts it is prefilling, a
  ``SoloGenerator`` step one pass; the in-process limit runs one or two.
- ``generator_s_per_token``: time in the generators' ``next`` (the forward passes, mlx-lm's
  own bookkeeping and sampling) per token produced.
- ``worker_python_s_per_token``: the rest of a round (inbox, admission, detokenizing,
  stop strings, building chunks, posting them) per token: what the daemon adds on the
  worker thread.
- ``cpu_share``: the worker thread's CPU time over its wall time in those rounds; under 1
  where it waited (for MLX's compute threads, or for the GIL while the event loop ran).

Threading: worker thread only (``PROFILE`` is created at import and read-only after).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(slots=True)
class Round:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    generator_s: float = 0.0
    passes: int = 0
    steps: int = 0
    tokens: int = 0
    sequences: int = 0


@dataclass
class RoundProfile:
    path: Path
    rounds: list[Round] = field(default_factory=list)
    _round: Round | None = None
    _wall: float = 0.0
    _cpu: float = 0.0

    def begin(self, sequences: int) -> None:
        self._round = Round(sequences=sequences)
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def stepped(self, passes: int, seconds: float, tokens: int) -> None:
        if self._round is not None:
            self._round.passes += passes
            self._round.steps += 1
            self._round.generator_s += seconds
            self._round.tokens += tokens

    def end(self) -> None:
        r, self._round = self._round, None
        if r is None or not r.steps:
            return
        r.wall_s = time.perf_counter() - self._wall
        r.cpu_s = time.thread_time() - self._cpu
        self.rounds.append(r)

    def summary(self) -> dict[str, float]:
        rounds = self.rounds
        tokens = sum(r.tokens for r in rounds) or 1
        wall = sum(r.wall_s for r in rounds) or 1e-9
        generator = sum(r.generator_s for r in rounds)
        return {
            "rounds": len(rounds),
            "tokens": sum(r.tokens for r in rounds),
            "passes_per_round": sum(r.passes for r in rounds) / max(1, len(rounds)),
            "steps_per_round": sum(r.steps for r in rounds) / max(1, len(rounds)),
            "sequences_per_round": sum(r.sequences for r in rounds) / max(1, len(rounds)),
            "round_s": wall / max(1, len(rounds)),
            "generator_s_per_token": generator / tokens,
            "worker_python_s_per_token": (wall - generator) / tokens,
            "cpu_share": sum(r.cpu_s for r in rounds) / wall,
        }

    def write(self) -> None:
        data = {"summary": self.summary(), "rounds": [asdict(r) for r in self.rounds]}
        self.path.write_text(json.dumps(data))


def _from_env() -> RoundProfile | None:
    path = os.environ.get("MLXD_PROFILE_ROUNDS")
    return RoundProfile(Path(path)) if path else None


PROFILE = _from_env()
