"""What the async and sync clients share: building requests, reading replies, the
``Completion`` result."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args

import msgspec

from mlxd.protocol import ChatMessage, Done, Generate, Progress, ServerMessage, ToolCall, Warm
from mlxd.protocol import decode_server_message as _decode
from mlxd.protocol.paths import socket_path_problem

from .exceptions import DaemonUnavailableError, PermissionDeniedError

Messages = Sequence[ChatMessage | Mapping[str, str]]
T = TypeVar("T", Generate, Warm)
OnProgress = Callable[[Progress], None]
"""Called with each ``progress`` of a request that waits for its model to load."""

_KNOWN_TYPES = frozenset(t.__struct_config__.tag for t in get_args(ServerMessage))


def check_socket_owner(path: Path) -> None:
    """Refuse a socket that is not our own user's, before connecting to it.

    Whoever owns the socket file runs the server behind it; a socket another user made
    (in a folder they could write to) would receive our prompts. Strict for root too: root
    talking to another user's daemon is refused like anyone else.
    """
    problem = socket_path_problem(path)
    if problem is not None:  # connect would say only "no such file"
        raise DaemonUnavailableError("daemon_unavailable", problem)
    try:
        owner = os.stat(path).st_uid
    except OSError as exc:
        raise DaemonUnavailableError(
            "daemon_unavailable", f"no mlxd at {path}: {exc.strerror or exc}"
        ) from exc
    if owner != os.getuid():
        raise PermissionDeniedError(
            "permission_denied",
            f"the socket {path} belongs to uid {owner}, not to you (uid {os.getuid()}): "
            "it is not your mlxd, so nothing was sent to it",
        )


def decode_server_message(payload: bytes) -> Any | None:
    """One server message, or None for a type this client does not know: later servers of
    protocol version 1 may send new ones, and clients are to ignore them (PROTOCOL.md)."""
    try:
        return _decode(payload)
    except msgspec.ValidationError:
        raw = msgspec.msgpack.decode(payload)
        if isinstance(raw, dict) and raw.get("type") not in _KNOWN_TYPES:
            return None
        raise


def _prompted(
    cls: type[T],
    request_id: int,
    prompt: str | None,
    messages: Messages | None,
    tokens: Sequence[int] | None,
    options: dict[str, Any],
) -> T:
    """A request with exactly one of prompt, messages or tokens, and ``options`` as fields."""
    chat = None
    if messages is not None:
        chat = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in messages]
    return cls(
        id=request_id,
        prompt=prompt,
        messages=chat,
        tokens=list(tokens) if tokens is not None else None,
        **{k: v for k, v in options.items() if v is not None},
    )


def generate_request(
    request_id: int,
    prompt: str | None = None,
    *,
    messages: Messages | None = None,
    tokens: Sequence[int] | None = None,
    **options: Any,
) -> Generate:
    """A ``Generate``; ``options`` are its fields (model, max_tokens, temperature, stop, ...)."""
    return _prompted(Generate, request_id, prompt, messages, tokens, options)


def warm_request(
    request_id: int,
    prompt: str | None = None,
    *,
    messages: Messages | None = None,
    tokens: Sequence[int] | None = None,
    **options: Any,
) -> Warm:
    """A ``Warm``; ``options`` are its fields (model, pin, ttl_s, keep_alive, priority)."""
    return _prompted(Warm, request_id, prompt, messages, tokens, options)


@dataclass(frozen=True)
class Completion:
    """A finished generation: all its text and token ids, and the daemon's ``done``."""

    text: str
    tokens: list[int]
    done: Done
    reasoning: str = ""
    """A thinking model's reasoning, apart from ``text`` (the answer)."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The tool calls the model made (a request with ``tools``), parsed."""
