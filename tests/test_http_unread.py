"""An HTTP client that stops reading its stream gives up its batch place, as a native
connection does (issue 13 item 14 on the HTTP front end), and still gets all of its text.

Over ``--http unix:PATH``, where the socket's buffers are small and fixed, so a client that
reads nothing soon makes the daemon's writes wait.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import short_tmpdir, start_daemon
from helpers import UnreadHttpStream, reference, wait_for

PROMPT = "greedy 0:"
MAX_TOKENS = 3000  # this prompt runs to the end on the tiny model: ~540 KB of SSE


def test_an_http_stream_nobody_reads_gives_up_its_batch_place(tiny_model: Path) -> None:
    base = short_tmpdir()
    http = base / "http" / "mlxd-http.sock"
    d = start_daemon(
        base / "mlxd.sock", "--model", f"tiny={tiny_model}", "--default-model", "tiny",
        "--max-batch-size", "1", "--http", f"unix:{http}",
    )  # fmt: skip
    try:
        expected = reference(tiny_model, PROMPT, MAX_TOKENS)[0]
        request = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0}
        stream = UnreadHttpStream(http, "/v1/completions", request)
        with d.client() as c:
            # Unread, its one place in the batch goes to others...
            wait_for(c, lambda s: s.sequences_preempted >= 1)
            done = c.generate("ok", max_tokens=4).done
            assert done.finish_reason == "length"
            # ...while it still has its own work in flight.
            assert c.stats().requests_in_flight >= 2
        text = [event["choices"][0]["text"] for event in stream.events()]
        assert "".join(text) == expected
        assert d.stop() == 0, d.log()
    finally:
        if d.proc.poll() is None:
            d.stop(9)
        shutil.rmtree(base, ignore_errors=True)
