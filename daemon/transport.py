"""The Unix socket: creating it safely, refusing to steal one a live daemon owns, or
adopting the one a service manager made for us (socket activation).

Socket activation: systemd passes listening sockets as fds 3.. with ``LISTEN_FDS`` and
``LISTEN_PID`` (the ``sd_listen_fds`` protocol); launchd hands them out through
``launch_activate_socket`` in libSystem, by the name of the plist's ``Sockets`` entry. An
adopted socket's file belongs to the manager: the daemon never creates, chmods or unlinks it.

Other users: the socket's folder must be ours and closed to everyone else (``prepare_dir``),
and nothing in it is opened through a symlink (``O_NOFOLLOW``): a folder another user can
write to lets them swap the socket for theirs, or point the lock at a file of ours.

Threading: called once from the main thread before the event loop serves.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import pwd
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import structlog

LAUNCHD_SOCKET_NAME = "Listeners"
"""The key of the socket in the LaunchAgent plist's ``Sockets`` dictionary."""

SD_LISTEN_FDS_START = 3


class AlreadyRunning(RuntimeError):
    pass


class ActivationError(RuntimeError):
    """The service manager said it passed a socket, but what it passed cannot be served."""


class UnsafePath(RuntimeError):
    """The socket's folder, or a file in it, could let another user in: refused at start."""


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _open_own_file(path: Path, flags: int) -> int:
    """``path`` opened without following a symlink, and only if it is a regular file of ours.

    A file reached through a planted symlink (or a hard link) would be someone else's to
    truncate; ``O_NOFOLLOW`` closes the first, the ``fstat`` of what was opened the rest.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symlink; remove it (rm {path})") from exc
        raise
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_uid != os.getuid():
        problem = f"belongs to {_who(st.st_uid)}, not to {_who(os.getuid())}"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} hard links"
    if problem is not None:
        os.close(fd)
        raise UnsafePath(f"{path} {problem}; remove it (rm {path})")
    return fd


class SocketLock:
    """An exclusive ``flock`` beside the socket: held for the daemon's life, freed by the
    kernel when the process dies, so a crashed daemon never blocks the next one.

    The file is reused from run to run (no ``O_EXCL``), so it is opened with ``O_NOFOLLOW``
    and must be a regular file of ours before the pid is written into it."""

    def __init__(self, socket_path: Path) -> None:
        self.path = socket_path.with_name(socket_path.name + ".lock")
        self._fd = _open_own_file(self.path, os.O_RDWR | os.O_CREAT)
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
    """The pid of the daemon holding ``socket_path``'s lock, or None if none holds it.

    A lock that is a symlink, or not a file of ours, is none a daemon of ours can hold
    (``SocketLock`` refuses them): None, so ``mlxd stop`` never signals a pid planted there.
    """
    lock = socket_path.with_name(socket_path.name + ".lock")
    try:
        fd = _open_own_file(lock, os.O_RDONLY)
    except (FileNotFoundError, UnsafePath):
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


def prepare_dir(path: Path) -> None:
    """Create the socket's folder, 0700, if it is missing; refuse one others could use.

    The folder must be a real folder (not a symlink), ours, and closed to group and others:
    whoever can write to it can replace the socket with theirs and read the prompts sent to
    it. Refused rather than fixed: another user's folder is not ours to chmod, and a folder
    of ours left open is a choice the user should see and undo (``chmod 700``).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        old_umask = os.umask(0o077)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        finally:
            os.umask(old_umask)
        st = os.lstat(path)  # what is there now, whoever made it
    fix = "remove it, or choose another --socket (MLXD_SOCKET)"
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"the socket folder {path} is a symlink; {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"the socket folder {path} is not a folder; {fix}")
    if st.st_uid != os.getuid():
        raise UnsafePath(
            f"the socket folder {path} belongs to {_who(st.st_uid)}, not to "
            f"{_who(os.getuid())}: its owner could replace the socket; {fix}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise UnsafePath(
            f"the socket folder {path} has mode {mode:04o}: other users could replace the "
            f"socket; make it private (chmod 700 {path})"
        )


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


class InheritedSocket(NamedTuple):
    sock: socket.socket
    path: Path | None
    """The file the socket is bound to; None for an unnamed or abstract socket."""
    manager: str
    """``systemd`` or ``launchd``."""


def inherited_socket(launchd_name: str = LAUNCHD_SOCKET_NAME) -> InheritedSocket | None:
    """The listening socket a service manager passed to this process, or None.

    Looks for systemd's ``LISTEN_FDS`` first (any platform), then, on macOS, asks launchd.
    """
    fd = _systemd_listen_fd()
    if fd is not None:
        return _adopt(fd, "systemd")
    if sys.platform == "darwin":
        fd = _launchd_listen_fd(launchd_name)
        if fd is not None:
            return _adopt(fd, "launchd")
    return None


def _systemd_listen_fd() -> int | None:
    """``sd_listen_fds(unset_environment=1)``: the first passed fd, if the fds are ours."""
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    # Unset in every case, as sd_listen_fds does: the variables describe one process only,
    # and a child of ours must never think the fds are meant for it.
    if pid is None or count is None:
        return None
    try:
        if int(pid) != os.getpid():
            return None  # meant for the process that exec'd us, not for us
        n = int(count)
    except ValueError as exc:
        raise ActivationError(f"LISTEN_PID={pid!r} LISTEN_FDS={count!r}: not numbers") from exc
    if n < 1:
        return None
    if n > 1:
        # mlxd listens on one socket; the extra fds stay open but unused.
        structlog.get_logger("mlxd.transport").warning("extra_listen_fds", count=n)
    return SD_LISTEN_FDS_START


def _launchd_listen_fd(name: str) -> int | None:
    """``launch_activate_socket(name, &fds, &count)``: 0 on success, else an errno."""
    path = ctypes.util.find_library("System") or "/usr/lib/libSystem.B.dylib"
    libsystem = ctypes.CDLL(path, use_errno=True)
    activate = libsystem.launch_activate_socket
    activate.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.POINTER(ctypes.c_int)),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    activate.restype = ctypes.c_int
    fds = ctypes.POINTER(ctypes.c_int)()
    count = ctypes.c_size_t(0)
    err = activate(name.encode(), ctypes.byref(fds), ctypes.byref(count))
    if err in (errno.ESRCH, errno.ENOENT):
        # ESRCH: not started by launchd (a terminal); ENOENT: no socket of that name.
        return None
    if err:
        raise ActivationError(f"launch_activate_socket({name!r}): {os.strerror(err)}")
    try:
        got = [fds[i] for i in range(count.value)]
    finally:
        libsystem.free.argtypes = [ctypes.c_void_p]
        libsystem.free(fds)  # the array is malloc'd for us; the fds are ours to keep
    if not got:
        return None
    for extra in got[1:]:
        os.close(extra)  # a Unix path yields one fd; anything more we would never serve
    return got[0]


def _adopt(fd: int, manager: str) -> InheritedSocket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"{manager} passed fd {fd}, which is not a socket: {exc}") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(f"{manager} passed fd {fd}, which is not a Unix stream socket")
    os.set_inheritable(fd, False)
    if hasattr(socket, "SO_ACCEPTCONN") and not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.listen(128)  # bound but not yet listening (a hand-made socket): finish the job
    sock.setblocking(False)
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = name.decode(errors="surrogateescape")
    path = Path(name) if name and not name.startswith("\0") else None
    return InheritedSocket(sock, path, manager)
