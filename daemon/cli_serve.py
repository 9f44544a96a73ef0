"""``mlxd serve``: the daemon's start, from the command line to a running server.

The configuration is loaded and checked (every model source a model, the socket paths
bindable, the BLAS library) before anything is created, so a broken one ends in one line
and exit 78, before a socket a service manager or a client could see; a Hugging Face repo
the cache lacks is downloaded here, before the socket too. Then the server runs on uvloop
(plain asyncio where uvloop has no wheel) until it stops.

Threading: the main thread only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from mlxd.protocol.paths import socket_path_problem

from .cli_args import EXIT_CONFIG
from .config import Config

SOCKET_SETTINGS = "--socket (MLXD_SOCKET, or the configuration file's socket)"


def serve(args: argparse.Namespace) -> int:
    import structlog

    from . import blas, hub, logs, preflight, settings

    flags, env = vars(args), dict(os.environ)
    try:
        loaded = settings.load(flags, env, args.config)
        missing = preflight.check(loaded, download=True)  # every model source a model
    except settings.ConfigError as exc:
        # Before the socket exists: a service manager sees the failure, clients see no daemon.
        print(f"mlxd: error: invalid_config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    config = loaded.config
    problem = _unbindable_socket(config)
    if problem is not None:  # before anything is created: nothing to clean up
        print(f"mlxd: error: invalid_config: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    # Before MLX loads (nothing so far imported it): this may re-execute the process.
    choice = blas.select(config.blas, can_reexec=getattr(args, "own_command_line", False))
    if choice is not None and choice.error:
        print(f"mlxd: error: blas_unavailable: {choice.error}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(config.log_level, config.log_format)
    log = structlog.get_logger("mlxd.server")
    log.info("config_loaded", file=str(loaded.path) if loaded.file_found else None)
    if choice is not None:
        say = log.warning if choice.reason in blas.WARNINGS else log.info
        say("blas_selected", **blas.log_fields(choice, config.blas))
    try:  # repos the Hugging Face cache lacks, as mlx-lm's load would: before the socket
        preflight.fetch(missing, log)
    except settings.ConfigError as exc:
        print(f"mlxd: error: invalid_config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except hub.HubError as exc:
        print(f"mlxd: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1

    def reload() -> Config:
        # SIGHUP: the file again, under the environment and flags the daemon started with.
        loaded = settings.load(flags, env, args.config)
        preflight.check(loaded, download=False)
        return loaded.config

    lockstep = None
    if config.distributed:  # every rank agrees, or none starts (daemon/distributed.py)
        from . import distributed

        try:
            config, lockstep = distributed.prepare(config)
        except distributed.RefusedToStart as exc:
            print(f"mlxd: error: invalid_config: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if not lockstep.leads:
            _leave(distributed.follow(config, lockstep))
    # No reload in distributed mode: every rank must run the one configuration.
    _leave(run_server(config, None if lockstep is not None else reload, lockstep))


def _leave(code: int) -> NoReturn:
    """Exit with ``code``. Everything is closed and flushed by now. Leave without running
    C++ static destructors:
    MLX's stream threads can still be winding down from the worker thread's exit, and
    destroying them then aborts the process ("terminate called without an active
    exception"), turning a clean exit into a crash report."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _unbindable_socket(config: Config) -> str | None:
    """Why a socket the daemon would bind cannot exist (one line), or None."""
    from .http_auth import parse_listen

    problem = socket_path_problem(Path(config.socket_path).expanduser())
    if problem is not None:
        return f"{problem}: use a shorter {SOCKET_SETTINGS}"
    try:
        where = parse_listen(config.http) if config.http else None
    except ValueError:  # check_http says what is wrong with it
        where = None
    problem = socket_path_problem(where) if isinstance(where, Path) else None
    return None if problem is None else f"{problem}: use a shorter --http unix:PATH"


def run_server(
    config: Config, reload: Callable[[], Config] | None = None, lockstep: Any = None
) -> int:
    import asyncio

    from .http_auth import HttpRefused, check_http
    from .server import Server
    from .transport import ActivationError, AlreadyRunning, UnsafePath

    try:
        import uvloop
    except ImportError:  # e.g. a platform without uvloop wheels: plain asyncio serves too
        uvloop = None
    if config.http:  # refused before anything binds: one line, exit 1
        try:
            check_http(config)
        except HttpRefused as exc:
            print(f"mlxd: error: http_refused: {exc}", file=sys.stderr)
            return 1
    server = Server(config, reload, lockstep)
    try:
        if uvloop is not None:
            return uvloop.run(server.serve())
        return asyncio.run(server.serve())
    except AlreadyRunning as exc:
        print(f"mlxd: error: already_running: {exc}", file=sys.stderr)
        return 1
    except ActivationError as exc:
        print(f"mlxd: error: activation_failed: {exc}", file=sys.stderr)
        return 1
    except UnsafePath as exc:
        print(f"mlxd: error: unsafe_socket_path: {exc}", file=sys.stderr)
        return 1
    except HttpRefused as exc:  # e.g. its port taken, found only when it binds
        print(f"mlxd: error: http_refused: {exc}", file=sys.stderr)
        return 1
