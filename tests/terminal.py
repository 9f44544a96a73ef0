"""A real terminal for CLI tests: a command run on a pty, read and typed into as a person
would (tests/test_cli_chat.py, tests/test_dev.py)."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import select
import struct
import termios
import time
from pathlib import Path


class Terminal:
    """A command as the foreground process of a pty, as a user's shell would run it: what
    is typed goes through the terminal's line discipline (``\\x03`` is SIGINT)."""

    def __init__(
        self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            try:
                if cwd is not None:
                    os.chdir(cwd)
                os.execve(argv[0], argv, os.environ if env is None else env)
            finally:
                os._exit(127)
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
