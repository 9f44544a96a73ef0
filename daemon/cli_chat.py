"""``mlxd chat``: an interactive conversation with the daemon, one turn at a time.

On a terminal: Ctrl-C while a reply streams cancels that reply (the daemon is told at once;
the turn is left out of the conversation, as if it had not been asked) and the chat goes
on; a second Ctrl-C before the reply has stopped ends the chat. Ctrl-C or Ctrl-D (EOF) at
the prompt, or an empty line, ends the chat with exit 0, on a fresh line. Off a terminal
(a pipe) each line of stdin is one turn; EOF or an empty line ends it.

Threading: the CLI's main thread (it owns SIGINT while a reply streams).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from mlxd.client import Chunk, Client

from .progressbar import LoadProgressBar


def _read_turn(interactive: bool) -> str | None:
    """The user's next message, or None when the chat should end."""
    if not interactive:
        line = sys.stdin.readline()
        return line.rstrip("\n") if line.strip() else None
    try:
        line = input("> ")
    except (EOFError, KeyboardInterrupt):
        # The terminal's cursor is after the prompt (or its echoed ^C): end on a fresh line.
        sys.stdout.write("\n")
        return None
    return line if line.strip() else None


class _Interrupt:
    """SIGINT while a reply streams: the first asks the reply to stop, a second one (the
    reply has not stopped yet: a model still loading, say) ends the chat."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None

    def __enter__(self) -> _Interrupt:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def run_chat(client: Client, system: str | None, options: dict[str, Any]) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        # Line editing and history for input(); a Python built without it still chats.
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
    history: list[dict[str, str]] = []
    if system:
        history.append({"role": "system", "content": system})
    interrupt = _Interrupt()
    with LoadProgressBar(final_line=False) as bar:
        while True:
            line = _read_turn(interactive)
            if line is None:
                return 0
            turn = [*history, {"role": "user", "content": line}]
            reply: list[str] = []
            finished = False
            with interrupt:
                stream = client.stream(messages=turn, on_progress=bar, **options)
                try:
                    # Checked between messages, never inside a read: a frame is never left
                    # half read, and closing the stream cancels the request and reads up
                    # to its end, so the connection serves the next turn.
                    for message in stream:
                        if interrupt.requested:
                            break
                        if isinstance(message, Chunk):
                            reply.append(message.text)
                            sys.stdout.write(message.text)
                            sys.stdout.flush()
                        else:
                            finished = True
                finally:
                    stream.close()
            sys.stdout.write("\n")
            if not finished:
                print("(reply cancelled)", file=sys.stderr)
                continue
            history = [*turn, {"role": "assistant", "content": "".join(reply)}]
