"""The CLI's report of a model load: a bar redrawn in place on a terminal, else one line.

``LoadProgressBar`` is an ``on_progress`` callback for the client (``Client.load``,
``Client.stream``): it draws each ``progress`` message it is given on stderr. On a terminal
the bar is redrawn on one line and ended with a newline when the load completes; off a
terminal (a log, a pipe) only the final line is written, and only when ``final_line`` is
set, so a script's stderr stays quiet unless it asked for a load. Stdout is never touched.

Threading: the CLI's main thread.
"""

from __future__ import annotations

import sys
from typing import TextIO

from mlxd.protocol import Progress

from .cli_output import human_bytes

BAR_WIDTH = 30


def render(p: Progress, bar: bool = True) -> str:
    """``loading NAME [#####-----]  50%  1.2 GiB / 2.4 GiB``; without ``bar``, no brackets."""
    fraction = p.done_bytes / p.total_bytes if p.total_bytes else 1.0
    fraction = min(1.0, max(0.0, fraction))
    sizes = f"{human_bytes(p.done_bytes)} / {human_bytes(p.total_bytes)}"
    if not bar:
        return f"{p.stage} {p.model}: {fraction:.0%} ({sizes})"
    filled = round(fraction * BAR_WIDTH)
    drawn = "#" * filled + "-" * (BAR_WIDTH - filled)
    return f"{p.stage} {p.model} [{drawn}] {fraction:4.0%}  {sizes}"


class LoadProgressBar:
    def __init__(self, stream: TextIO | None = None, *, final_line: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._final_line = final_line
        self._open = False
        """A bar is drawn and its line not yet ended."""

    def __call__(self, p: Progress) -> None:
        finished = p.done_bytes >= p.total_bytes
        if self._tty:
            # \r and "erase to the end of the line": the next figure replaces this one.
            self._stream.write(f"\r{render(p)}\x1b[K")
            self._open = not finished
            if finished:
                self._stream.write("\n")
        elif finished and self._final_line:
            self._stream.write(render(p, bar=False) + "\n")
        self._stream.flush()

    def close(self) -> None:
        """End a bar left half-drawn (the load failed, or was interrupted)."""
        if self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False

    def __enter__(self) -> LoadProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
