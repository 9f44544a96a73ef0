"""``mlxd chat`` on a real terminal (a pty): Ctrl-C cancels the reply in progress and the
chat goes on; Ctrl-C or Ctrl-D at the prompt ends it, exit 0, on a fresh line."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import Daemon
from helpers import chat_tokens, reference
from terminal import Terminal


def chat(*args: str) -> Terminal:
    return Terminal([sys.executable, "-m", "mlxd.daemon", "chat", *args])


def reference_chat(model_dir: Path, content: str, max_tokens: int) -> str:
    messages = [{"role": "user", "content": content}]
    return reference(model_dir, chat_tokens(model_dir, messages), max_tokens)[0]


def test_ctrl_c_cancels_the_reply_and_ctrl_d_ends_the_chat(
    daemon: Daemon, tiny_model: Path
) -> None:
    with daemon.client() as client:
        cancelled = client.stats().requests_cancelled
    # The tiny model's replies run to its context (4000 tokens): long enough to interrupt.
    term = chat("--socket", str(daemon.socket), "--max-tokens", "8000")
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
    term = chat("--socket", str(daemon.socket), "--max-tokens", "4")
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
