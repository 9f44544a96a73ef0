"""Another user on the same machine: a socket folder they own or can write to, a lock that
points at our files, a socket of theirs posing as ours. The daemon refuses to start; the
clients refuse to send anything."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from conftest import short_tmpdir

from mlxd.client import AsyncClient, Client, PermissionDeniedError
from mlxd.daemon.transport import running_pid

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")


def serve_once(sock: Path, model: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """``mlxd serve`` that is expected to refuse at once (a daemon that serves times out)."""
    return subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "serve", "--socket", str(sock),
         "--model", f"tiny={model}", "--state-dir", str(state), "--log-format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def assert_refused(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == 1, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("mlxd: error:")]
    assert len(lines) == 1 and lines[0].startswith("mlxd: error: unsafe_socket_path:"), out.stderr
    for word in words:
        assert word in lines[0], lines[0]


def victim_file(base: Path) -> Path:
    victim = base / "victim.txt"
    victim.write_bytes(b"the victim's precious data\n")
    return victim


@needs_root
def test_a_folder_another_user_owns_and_opened_is_refused_and_its_lock_link_not_followed(
    tiny_model: Path,
) -> None:
    # The attack as found: nobody pre-creates the fallback folder, 0777, with the lock a
    # symlink to a file of the victim's.
    base = short_tmpdir()
    victim = victim_file(base)
    evil = base / "mlxd-evil"
    evil.mkdir()
    os.chmod(evil, 0o777)
    os.chown(evil, NOBODY, NOBODY)
    link = evil / "mlxd.sock.lock"
    link.symlink_to(victim)
    os.lchown(link, NOBODY, NOBODY)
    try:
        out = serve_once(evil / "mlxd.sock", tiny_model, base / "state")
        assert_refused(out, str(evil), "uid 65534")
        assert victim.read_bytes() == b"the victim's precious data\n"
        assert sorted(p.name for p in evil.iterdir()) == ["mlxd.sock.lock"]  # no socket
        assert stat.S_IMODE(evil.stat().st_mode) == 0o777  # not ours to chmod
        assert evil.stat().st_uid == NOBODY
    finally:
        shutil.rmtree(base)


def test_a_folder_of_ours_open_to_others_is_refused_with_the_fix(tiny_model: Path) -> None:
    base = short_tmpdir()
    run = base / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)
    try:
        out = serve_once(run / "mlxd.sock", tiny_model, base / "state")
        assert_refused(out, str(run), "0755", f"chmod 700 {run}")
        assert list(run.iterdir()) == []  # neither a lock nor a socket
        assert stat.S_IMODE(run.stat().st_mode) == 0o755
    finally:
        shutil.rmtree(base)


def test_a_socket_folder_that_is_a_symlink_is_refused(tiny_model: Path) -> None:
    base = short_tmpdir()
    real = base / "real"
    real.mkdir(mode=0o700)
    (base / "link").symlink_to(real)
    try:
        out = serve_once(base / "link" / "mlxd.sock", tiny_model, base / "state")
        assert_refused(out, str(base / "link"), "symlink")
        assert list(real.iterdir()) == []
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_a_lock_that_links_elsewhere_in_our_private_folder_is_refused(
    tiny_model: Path, kind: str
) -> None:
    base = short_tmpdir()  # 0700 and ours: only the lock is wrong
    victim = victim_file(base)
    lock = base / "mlxd.sock.lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    else:
        os.link(victim, lock)
    try:
        out = serve_once(base / "mlxd.sock", tiny_model, base / "state")
        assert_refused(out, str(lock), f"rm {lock}")
        assert victim.read_bytes() == b"the victim's precious data\n"
        assert not (base / "mlxd.sock").exists()
    finally:
        shutil.rmtree(base)


@needs_root
def test_mlxd_stop_never_reads_a_pid_from_a_lock_it_could_not_have_written() -> None:
    # A lock of nobody's, held, with a pid in it: `mlxd stop` would signal that pid.
    base = short_tmpdir()
    lock = base / "mlxd.sock.lock"
    lock.write_text("1\n")
    os.chown(lock, NOBODY, NOBODY)
    held = os.open(lock, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    link_base = short_tmpdir()
    (link_base / "mlxd.sock.lock").symlink_to(lock)
    try:
        assert running_pid(base / "mlxd.sock") is None
        assert running_pid(link_base / "mlxd.sock") is None
        os.chown(lock, 0, 0)  # the same lock, ours: then it is a daemon's
        assert running_pid(base / "mlxd.sock") == 1
    finally:
        os.close(held)
        shutil.rmtree(base)
        shutil.rmtree(link_base)


@needs_root
async def test_clients_send_nothing_to_a_socket_another_user_owns() -> None:
    base = short_tmpdir()
    path = base / "mlxd.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    os.chmod(base, 0o755)
    os.chown(path, NOBODY, NOBODY)  # as if nobody had put it there
    try:
        with pytest.raises(PermissionDeniedError, match="uid 65534") as raised:
            Client(path, timeout=5)
        assert raised.value.code == "permission_denied"
        with anyio.fail_after(10), pytest.raises(PermissionDeniedError, match="uid 65534"):
            async with AsyncClient(path):
                pass
        # What the fake server got: no connection, so not a byte of a hello.
        server.setblocking(False)
        received = b""
        connections = 0
        while True:
            try:
                conn, _ = server.accept()
            except BlockingIOError:
                break
            connections += 1
            conn.settimeout(1)
            with conn, contextlib.suppress(TimeoutError):
                received += conn.recv(65536)
        assert (connections, received) == (0, b"")
    finally:
        server.close()
        shutil.rmtree(base)
