"""``mlxd serve --distributed``: the ranks' start-up, and a follower rank's life.

Under ``mlx.launch`` every rank runs ``mlxd serve --distributed`` with the same flags.
Before anything is bound or loaded, the ranks agree (daemon/lockstep.py): rank 0's
fingerprint of what decides the workers' rounds (the models, by the content of their
weights, and the limits and budgets) must be every rank's, or every rank refuses to start
(exit 78); and one random seed, so sampled tokens are the same on every rank. Then rank 0
serves as a daemon does (socket, HTTP, its worker leading the rounds), and every other
rank runs a follower: the same worker, no front end, its events dropped, its rounds
rank 0's.

A follower exits 0 when rank 0's worker stops (rank 0 drained on SIGTERM), non-zero when
its worker dies (a lost peer makes the round's collective fail) or when no round came for
the stall timeout (rank 0 sends one at least every second: it is gone or stalled).

Not in this mode: draft models (mlx-lm's server gives them up too), a configuration
reload on SIGHUP, and saving the prompt cache (each rank's share would need its own
files).

Threading: the main thread (start-up, the follower's watchdog); the worker is its own.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import structlog

from .config import Config
from .lockstep import HEARTBEAT_S, Lockstep, check_same, fingerprint

log = structlog.get_logger("mlxd.distributed")

# What differs between ranks without changing a round's decisions.
_LOCAL = {
    "socket_path", "http", "api_key_file", "state_dir", "log_level", "log_format", "blas",
    "allow_root", "demo_model_dir", "models", "models_dir", "cache_persist",
}  # fmt: skip


class RefusedToStart(Exception):
    """This mode cannot run with this configuration (exit 78, as a bad configuration)."""


def prepare(config: Config) -> tuple[Config, Lockstep]:
    """The group and this rank's ``Lockstep``, the configuration every rank runs with;
    raises ``RefusedToStart`` (on every rank alike) when the ranks disagree."""
    import mlx.core as mx

    group = mx.distributed.init()
    if group.size() < 2:
        raise RefusedToStart(
            "--distributed: this process is the only rank (start every rank with mlx.launch)"
        )
    drafts = [n for n, o in config.model_options.items() if o.draft is not None]
    if drafts:
        raise RefusedToStart(f"--distributed: draft models are not supported ({drafts[0]})")
    config = msgspec.structs.replace(config, cache_persist=False)
    lockstep = Lockstep(group)
    problem = check_same(lockstep, _fingerprint(config), "configuration or model")
    if problem is not None:
        raise RefusedToStart(f"--distributed: {problem}")
    seed = random.getrandbits(62)
    seed = int(lockstep.agree(str(seed).encode()).decode())
    mx.random.seed(seed)
    log.info("distributed_ready", rank=lockstep.rank, size=lockstep.size)
    return config, lockstep


def _fingerprint(config: Config) -> str:
    from . import weights
    from .models import ModelRegistry

    fields = {k: v for k, v in msgspec.to_builtins(config).items() if k not in _LOCAL}
    parts = [msgspec.json.encode(fields, order="sorted").decode()]
    registry = ModelRegistry(config)
    names = list(config.models)
    if config.models_dir:
        names += sorted(p.name for p in Path(config.models_dir).expanduser().iterdir())
    for name in names:
        try:
            path = registry.resolve(name)
        except Exception:  # not a model: the same on every rank or not, said at its load
            continue
        if (path / "config.json").is_file():
            parts.append(f"{name}={weights.identity(path)}")
    return fingerprint(parts)


class _Dropped:
    """A follower's outbox: its events are rank 0's to send."""

    def post(self, events: list[Any]) -> None:
        pass


def follow(config: Config, lockstep: Lockstep) -> int:
    """Run this follower rank until rank 0 stops it (0) or it fails (1 or 3)."""
    from .worker import Worker

    died: list[BaseException] = []
    worker = Worker(config, _Dropped(), on_death=died.append, lockstep=lockstep)  # type: ignore[arg-type]
    worker.start()
    log.info("following", rank=lockstep.rank)
    limit = config.stall_timeout_s + HEARTBEAT_S
    while worker.alive():
        worker.join(0.5)
        quiet = time.monotonic() - worker.snapshot.progress_at
        if worker.alive() and quiet > limit:
            # Blocked in a collective rank 0 no longer takes part in: nothing will end it.
            log.critical("rank_stalled", rank=lockstep.rank, quiet_s=round(quiet, 1))
            print(f"mlxd: error: stalled: no round from rank 0 in {quiet:.0f} s", file=sys.stderr)
            return 3
    if died:
        print(f"mlxd: error: rank {lockstep.rank} failed: {died[0]!r}", file=sys.stderr)
        return 1
    log.info("follower_stopped", rank=lockstep.rank)
    return 0
