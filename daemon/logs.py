"""Structured logging with structlog: pretty on a terminal, JSON lines otherwise.

JSON whenever stderr is not a terminal: under launchd or systemd, or redirected to a file,
each line is one JSON object a log tool can read. Prompts and generated text are the
user's private data: they are logged only at ``debug`` level (``debug_enabled``).

Threading: ``setup`` runs on the main thread at start-up and on the event loop thread on
SIGHUP (a new level); loggers may be used from any thread. Loggers are not cached on first
use, so a reload's level reaches the loggers modules already hold.
"""

from __future__ import annotations

import logging
import sys

import structlog

_debug = False


def setup(level: str = "info", fmt: str = "auto") -> None:
    global _debug
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    # Console lines without colours off a terminal (``--log-format console`` to a file).
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric = _level(level)
    _debug = numeric <= logging.DEBUG
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info
            if as_json
            else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def debug_enabled() -> bool:
    """Whether private text (prompts) may be logged: only at ``debug`` level."""
    return _debug


def _level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    return level if isinstance(level, int) else logging.INFO
