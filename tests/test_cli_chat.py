"""``mlxd chat`` on a real terminal (a pty): Ctrl-C cancels the reply in progress and the
chat goes on; Ctrl-C or Ctrl-D at the prompt ends it, exit 0, on a fresh line."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time
from pathlib import Path

from conftest import Daemon
from helpers import chat_tokens, reference


class Terminal:
    """``mlxd chat`` as the foreground process of a pty, as a user's shell would run it:
    what is typed goes through the terminal's line discipline (``\\x03`` is SIGINT)."""

    def __init__(self, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.execv(sys.executable, [sys.executable, "-m", "mlxd.daemon", "chat", *args])
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.output = ""

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, text: str, start: int = 0, timeout: float = 120) -> int:
        """Read until ``text`` appears after ``start`` in the output; the index past it."""
        deadline = time.monotonic() + timeout
        while text not in self.output[start:]:
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"no {text!r} in the terminal's output:\n{self.output!r}")
        return self.output.index(text, start) + len(text)

    def wait_for_more(self, chars: int, timeout: float = 120) -> None:
        """Read until ``chars`` more characters have arrived."""
        deadline, want = time.monotonic() + timeout, len(self.output) + chars
        while len(self.output) < want:
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"the output stopped:\n{self.output!r}")

    def wait_until_asleep(self, timeout: float = 60) -> None:
        """Until the child sleeps: past its prompt, that is in the read of the next line.

        A SIGINT that lands between the prompt and that read is seen only at the next key
        (CPython's readline checks for signals when its select is interrupted), a race no
        person typing is fast enough to lose, but a test is."""
        stat = Path(f"/proc/{self.pid}/stat")
        if not stat.exists():  # no /proc (macOS): give it a moment
            time.sleep(0.5)
            return
        deadline = time.monotonic() + timeout
        # The state follows the parenthesised command name, which may hold spaces.
        while stat.read_text().rpartition(")")[2].split()[0] != "S":
            assert time.monotonic() < deadline, "the chat never waited for input"
            time.sleep(0.01)

    def exit_code(self, timeout: float = 60) -> int:
        """Read to the end; the child's exit status."""
        deadline = time.monotonic() + timeout
        while self._read(deadline - time.monotonic()):
            pass
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def _read(self, timeout: float) -> bool:
        """One read; False at EOF (the child is gone) or when ``timeout`` passes."""
        if timeout <= 0 or not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError as exc:  # Linux: EIO once the child has closed the terminal
            if exc.errno != errno.EIO:
                raise
            return False
        self.output += data.decode(errors="replace")
        return bool(data)

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def reference_chat(model_dir: Path, content: str, max_tokens: int) -> str:
    messages = [{"role": "user", "content": content}]
    return reference(model_dir, chat_tokens(model_dir, messages), max_tokens)[0]


def test_ctrl_c_cancels_the_reply_and_ctrl_d_ends_the_chat(
    daemon: Daemon, tiny_model: Path
) -> None:
    with daemon.client() as client:
        cancelled = client.stats().requests_cancelled
    # The tiny model's replies run to its context (4000 tokens): long enough to interrupt.
    term = Terminal("--socket", str(daemon.socket), "--max-tokens", "8000")
    try:
        at = term.expect("> ")
        term.type("hi\r")
        at = term.expect("hi\r\n", at)
        term.wait_for_more(100)  # the reply is streaming
        term.type("\x03")
        at = term.expect("(reply cancelled)", at)
        at = term.expect("> ", at)
        # The chat goes on, without the cancelled turn: the answer to "more" is the
        # answer to it alone.
        term.type("more\r")
        at = term.expect("more\r\n", at)
        expected = reference_chat(tiny_model, "more", 12).replace("\n", "\r\n")
        term.expect(expected, at)
        term.type("\x03")  # that one too
        at = term.expect("(reply cancelled)", at)
        at = term.expect("> ", at)
        term.type("\x04")  # Ctrl-D at the prompt
        assert term.exit_code() == 0, term.output
        assert term.output[at:].replace("\x1b[?2004l", "") == "\r\n"  # a fresh line, no more
    finally:
        term.kill()
    with daemon.client() as client:
        assert client.stats().requests_cancelled == cancelled + 2


def test_ctrl_c_at_the_prompt_ends_the_chat_on_a_fresh_line(daemon: Daemon) -> None:
    term = Terminal("--socket", str(daemon.socket), "--max-tokens", "4")
    try:
        at = term.expect("> ")
        term.wait_until_asleep()
        term.type("\x03")
        assert term.exit_code() == 0, term.output
        rest = term.output[at:].replace("\x1b[?2004l", "")
        assert rest.endswith("\r\n") and "Traceback" not in rest, rest
        assert rest.count("\n") == 1
    finally:
        term.kill()
