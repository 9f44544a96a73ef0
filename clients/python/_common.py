"""What the async and sync clients share: building requests, the ``Completion`` result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlxd.protocol import ChatMessage, Done, Generate, Warm

Messages = Sequence[ChatMessage | Mapping[str, str]]


def generate_request(
    request_id: int,
    prompt: str | None = None,
    *,
    messages: Messages | None = None,
    tokens: Sequence[int] | None = None,
    **options: Any,
) -> Generate:
    """A ``Generate``; ``options`` are its fields (model, max_tokens, temperature, stop, ...)."""
    chat = None
    if messages is not None:
        chat = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in messages]
    return Generate(
        id=request_id,
        prompt=prompt,
        messages=chat,
        tokens=list(tokens) if tokens is not None else None,
        **{k: v for k, v in options.items() if v is not None},
    )


def warm_request(
    request_id: int,
    prompt: str | None = None,
    *,
    messages: Messages | None = None,
    tokens: Sequence[int] | None = None,
    **options: Any,
) -> Warm:
    """A ``Warm``; ``options`` are its fields (model, pin, ttl_s, keep_alive, priority)."""
    chat = None
    if messages is not None:
        chat = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in messages]
    return Warm(
        id=request_id,
        prompt=prompt,
        messages=chat,
        tokens=list(tokens) if tokens is not None else None,
        **{k: v for k, v in options.items() if v is not None},
    )


@dataclass(frozen=True)
class Completion:
    """A finished generation: all its text and token ids, and the daemon's ``done``."""

    text: str
    tokens: list[int]
    done: Done
