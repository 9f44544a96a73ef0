"""The socket: private permissions, no stealing a live daemon's socket, stale ones replaced."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Daemon, short_tmpdir, start_daemon


def test_socket_is_0600_in_a_0700_folder_it_created(tiny_model: Path) -> None:
    base = short_tmpdir()
    path = base / "run" / "mlxd.sock"
    d = start_daemon(path, "--model", f"tiny={tiny_model}")
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_ISSOCK(path.stat().st_mode)
    finally:
        assert d.stop() == 0
    assert not path.exists()  # removed on a clean exit
    shutil.rmtree(base)


def test_second_daemon_refuses_while_first_is_alive(daemon: Daemon, tiny_model: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "serve", "--socket", str(daemon.socket),
         "--model", f"tiny={tiny_model}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "already_running" in proc.stderr
    with daemon.client() as client:  # the first one is untouched
        assert client.ping() > 0


def test_stale_socket_from_a_crashed_daemon_is_replaced(tiny_model: Path) -> None:
    base = short_tmpdir()
    path = base / "mlxd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens: what a crash leaves
    assert path.exists()
    d = start_daemon(path, "--model", f"tiny={tiny_model}")
    try:
        with d.client() as client:
            assert client.generate("hi", max_tokens=3).done.finish_reason == "length"
    finally:
        assert d.stop() == 0
    shutil.rmtree(base)


def test_a_killed_daemon_leaves_a_socket_the_next_one_replaces(tiny_model: Path) -> None:
    base = short_tmpdir()
    path = base / "mlxd.sock"
    first = start_daemon(path, "--model", f"tiny={tiny_model}")
    first.stop(sig=9)
    assert path.exists()
    second = start_daemon(path, "--model", f"tiny={tiny_model}")
    try:
        with second.client() as client:
            assert client.ping() > 0
    finally:
        assert second.stop() == 0
    shutil.rmtree(base)


def test_mlxd_stop_drains_and_waits(tiny_model: Path) -> None:
    base = short_tmpdir()
    path = base / "mlxd.sock"
    d = start_daemon(path, "--model", f"tiny={tiny_model}")
    out = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "stop", "--socket", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert d.proc.poll() == 0  # already exited, cleanly, when stop returned
    assert not path.exists()
    again = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "stop", "--socket", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode != 0 and "daemon_unavailable" in again.stderr
    shutil.rmtree(base)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_another_user_is_refused_even_through_a_loosened_socket(daemon: Daemon) -> None:
    # Loosen the file permissions on purpose: the peer-credential check must still refuse.
    os.chmod(daemon.socket.parent, 0o755)
    os.chmod(daemon.socket, 0o666)
    try:
        # A forked child, not a new interpreter: the venv may sit where nobody can read it.
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become nobody, connect, report the first frame
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(str(daemon.socket))
                os.write(write_end, s.recv(4096))
            finally:
                os._exit(0)
        os.close(write_end)
        frame = os.read(read_end, 4096)
        os.waitpid(pid, 0)
        assert b"permission_denied" in frame, frame
    finally:
        os.chmod(daemon.socket, 0o600)
        os.chmod(daemon.socket.parent, 0o700)
    with daemon.client() as client:  # the owner still gets in
        assert client.ping() > 0
