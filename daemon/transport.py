"""The Unix socket: creating it safely, and refusing to steal one a live daemon owns.

Threading: called once from the main thread before the event loop serves.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import sys
from pathlib import Path


class AlreadyRunning(RuntimeError):
    pass


class SocketLock:
    """An exclusive ``flock`` beside the socket: held for the daemon's life, freed by the
    kernel when the process dies, so a crashed daemon never blocks the next one."""

    def __init__(self, socket_path: Path) -> None:
        self.path = socket_path.with_name(socket_path.name + ".lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(f"another mlxd owns {socket_path}") from exc
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def running_pid(socket_path: Path) -> int | None:
    """The pid of the daemon holding ``socket_path``'s lock, or None if none holds it."""
    lock = socket_path.with_name(socket_path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
        fcntl.flock(fd, fcntl.LOCK_UN)  # we got it: nobody holds it
        return None
    finally:
        os.close(fd)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, from the kernel.

    Linux: ``SO_PEERCRED`` (pid, uid, gid). macOS: ``LOCAL_PEERCRED`` (``struct xucred``:
    version, then uid). None where neither exists.
    """
    if hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    if sys.platform == "darwin":
        sol_local, local_peercred = 0, 1  # <sys/un.h>: SOL_LOCAL, LOCAL_PEERCRED
        creds = sock.getsockopt(sol_local, local_peercred, 76)  # sizeof(struct xucred)
        return struct.unpack_from("=II", creds)[1]
    return None


def prepare_dir(path: Path) -> bool:
    """Make the socket's folder private to its owner (0700) if it is missing.

    An existing folder is left as it is (it may be /tmp, or shared on purpose); the socket
    itself is still 0600. Returns whether the folder is private.
    """
    if not path.exists():
        old_umask = os.umask(0o077)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        finally:
            os.umask(old_umask)
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # e.g. the backlog is full: someone is listening
    finally:
        probe.close()
    return True


def bind_unix_socket(path: Path) -> socket.socket:
    """A listening socket at ``path``, mode 0600, replacing a stale socket file.

    The caller holds the ``SocketLock`` first; the connect probe guards against a listener
    that is not an mlxd holding the lock (an old build, another program).
    """
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise AlreadyRunning(f"{path} exists and is not a socket")
        if _is_live(path):
            raise AlreadyRunning(f"a live server is listening on {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask first, so the socket file is never even briefly reachable by others.
    old_umask = os.umask(0o077)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock
