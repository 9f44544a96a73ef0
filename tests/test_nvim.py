"""The Neovim plugin (clients/nvim) in a real `nvim --headless`, against a real daemon.

tests/nvim/driver.lua types into a buffer key by key; this test checks what it saw against
mlx-lm's own greedy output and the daemon's counters, and stops and restarts the daemon
under it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import fim_tokens, reference

ROOT = Path(__file__).resolve().parent.parent
NVIM = shutil.which("nvim")
MAX_TOKENS = 200  # long enough to be still streaming when the next key supersedes it

pytestmark = pytest.mark.skipif(
    NVIM is None, reason="nvim is not installed (.ci/run installs Debian's neovim package)"
)


def wait_file(path: Path, nvim: subprocess.Popen[bytes], errors: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if errors.exists():
            pytest.fail(f"the driver failed: {json.loads(errors.read_text())['error']}")
        if nvim.poll() is not None:
            pytest.fail(f"nvim exited ({nvim.returncode}) before {path.name}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {path.name}")
        time.sleep(0.02)


def trace(path: Path, suggestion: str) -> str:
    """What the plugin's client dispatched, for a failure's message: each chunk's request
    id, text and token, and the size of each read."""
    rows = json.loads(path.read_text()) if path.exists() else []
    return f"suggestion {suggestion!r}; client trace: {rows}"


def test_nvim_plugin_completes_cancels_chats_and_survives_a_restart(
    tiny_model: Path, tmp_path: Path
) -> None:
    folder = short_tmpdir()
    sock = folder / "mlxd.sock"
    daemon: Daemon | None = start_daemon(sock, "--model", f"tiny={tiny_model}")
    sync, results = tmp_path / "sync", tmp_path / "results"
    sync.mkdir()
    results.mkdir()
    config = {
        "plugin": str(ROOT / "clients" / "nvim"),
        "socket": str(sock),
        "sync": str(sync),
        "results": str(results),
        "lines": ["import os", "", "def main():", "    "],
        "text": "print(os.getcwd())",
        "interval_ms": 120,
        "max_tokens": MAX_TOKENS,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = {
        **os.environ,
        "MLXD_NVIM_TEST": str(tmp_path / "config.json"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    driver = ROOT / "tests" / "nvim" / "driver.lua"
    assert NVIM is not None
    nvim = subprocess.Popen(
        [NVIM, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {driver}"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    errors = results / "error.json"
    try:
        wait_file(sync / "ready_for_restart", nvim, errors, 90)
        one = json.loads((results / "phase1.json").read_text())
        with daemon.client() as client:
            stats = client.stats()

        # The last completion, streamed into virtual text, is mlx-lm's greedy output.
        text, _ = reference(tiny_model, one["prefix"], MAX_TOKENS)
        assert one["suffix"] == ""  # typed at the end: a plain prompt
        assert one["prefix"].endswith("    " + config["text"])
        assert one["suggestion"] == text, trace(results / "trace1.json", one["suggestion"])
        assert one["shown"] == text and one["extmarks"] == 1
        assert one["after_accept"] == one["prefix"] + text  # <Tab> inserted it

        # Each key's request superseded the one before, and the daemon cancelled those.
        plugin = one["stats"]
        assert plugin["failed"] == 0
        assert plugin["cancelled"] >= 1
        assert stats.requests_cancelled == plugin["cancelled"]
        assert plugin["completed"] + plugin["cancelled"] == plugin["requests"]

        # The chat buffer holds the daemon's reply to the conversation.
        with daemon.client() as client:
            chat = client.chat([{"role": "user", "content": one["chat_prompt"]}], max_tokens=48)
        assert one["chat_reply"] == chat.text
        assert "mlxd models:" in one["messages"] and "tiny" in one["messages"]
        assert "mlxd: ready" in one["messages"]

        latencies = one["latencies_ms"]
        assert len(latencies) == one["keystrokes"]
        print(
            f"\nnvim typing session: {one['keystrokes']} keystrokes, keystroke to first "
            f"virtual-text character median {statistics.median(latencies):.1f} ms "
            f"(min {min(latencies):.1f}, max {max(latencies):.1f}; debounce 30 ms); "
            f"requests {plugin['requests']}: {plugin['completed']} completed, "
            f"{plugin['cancelled']} cancelled (daemon: {stats.requests_cancelled} cancelled)"
        )

        # The daemon stops: the plugin says so once, however many keys are typed.
        assert daemon.stop() == 0
        daemon = None
        (sync / "stopped").touch()
        wait_file(sync / "down_checked", nvim, errors, 30)
        daemon = start_daemon(sock, "--model", f"tiny={tiny_model}")
        (sync / "restarted").touch()
        assert nvim.wait(60) == 0
        if errors.exists():
            pytest.fail(f"the driver failed: {json.loads(errors.read_text())['error']}")
        two = json.loads((results / "phase2.json").read_text())
    finally:
        if nvim.poll() is None:
            nvim.kill()
            nvim.wait()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)

    down = two["down"]
    warnings = [n for n in down["notes"] if n["level"] >= 3]  # vim.log.levels.WARN
    assert len(warnings) == 1, down["notes"]
    assert down["state"] == "down" and down["failed"] >= 1
    # After the restart it reconnected (one "connected" note) and completed, mid-buffer:
    # fill in the middle, equal to mlx-lm's output for the same FIM tokens.
    assert two["state"] == "ready"
    assert any("connected" in n["msg"] for n in two["notes"][len(down["notes"]) :])
    assert two["suffix"] != "" and two["fim"] == "tokens"
    text, _ = reference(
        tiny_model, fim_tokens(tiny_model, two["prefix"], two["suffix"]), MAX_TOKENS
    )
    assert two["suggestion"] == text, trace(results / "trace2.json", two["suggestion"])


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a socket another user owns")
def test_nvim_client_sends_nothing_to_a_socket_another_user_owns(tmp_path: Path) -> None:
    folder = short_tmpdir()
    sock = folder / "mlxd.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    server.listen(8)
    os.chown(sock, 65534, 65534)  # as if nobody had put it there
    result = tmp_path / "result.json"
    script = tmp_path / "probe.lua"
    script.write_text(
        f"vim.opt.rtp:prepend({json.dumps(str(ROOT / 'clients' / 'nvim'))})\n"
        f"local client = require('mlxd.client').new({{ path = {json.dumps(str(sock))} }})\n"
        "local ended = nil\n"
        "client:request({ type = 'ping' }, { on_end = function(m) ended = m end })\n"
        "vim.wait(2000, function() return ended ~= nil end)\n"
        "local line = vim.fn.json_encode(ended or { code = 'no end' })\n"
        f"vim.fn.writefile({{ line }}, {json.dumps(str(result))})\n"
        "vim.cmd('qa!')\n"
    )
    assert NVIM is not None
    try:
        subprocess.run(
            [NVIM, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {script}"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        ended = json.loads(result.read_text())
        assert ended["code"] == "permission_denied", ended
        assert "uid 65534" in ended["message"]
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # it never connected: not a byte of a hello
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


REENTRANT = r"""
vim.opt.runtimepath:prepend(vim.env.MLXD_PLUGIN)
local client = require("mlxd.client")
local c = client.new({ path = "/nonexistent/mlxd.sock" })
c.state, c.pipe = "ready", {} -- as if connected: only _receive and _dispatch run here
local seen, reentered = {}, false
local function chunk(text)
  return client.frame({ type = "chunk", id = 1, text = text, tokens = { #seen } })
end
c.pending[1] = {
  on_message = function(m)
    table.insert(seen, m.text)
    if not reentered then
      -- A handler that lets Neovim's event queue run brings the next read in here.
      reentered = true
      c:_receive(chunk("c"))
    end
  end,
}
c:_receive(chunk("a") .. chunk("b"))
vim.fn.writefile({ vim.fn.json_encode(seen) }, vim.env.MLXD_OUT)
vim.cmd("qa!")
"""


def test_nvim_client_dispatches_each_frame_once_even_when_a_read_comes_in_reentrantly(
    tmp_path: Path,
) -> None:
    script, out = tmp_path / "reentrant.lua", tmp_path / "seen.json"
    script.write_text(REENTRANT)
    env = {**os.environ, "MLXD_PLUGIN": str(ROOT / "clients" / "nvim"), "MLXD_OUT": str(out)}
    assert NVIM is not None
    subprocess.run(
        [NVIM, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {script}"],
        env=env, stdin=subprocess.DEVNULL, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(out.read_text()) == ["a", "b", "c"]
