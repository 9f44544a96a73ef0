"""Where the daemon's socket lives by default: part of the contract, since every client
(the Python client, editor plugins) must find it without being told.

Order: ``$MLXD_SOCKET``; on macOS ``~/Library/Application Support/mlxd/mlxd.sock``; elsewhere
``$XDG_RUNTIME_DIR/mlxd/mlxd.sock``, or ``/tmp/mlxd-$UID/mlxd.sock`` without a runtime dir.

A Unix socket's path must fit the kernel's ``sun_path`` (``socket_path_problem``): the daemon
checks it before it binds, a client before it connects, so both can say so in one line.

Threading: pure functions; any thread.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SOCKET_ENV = "MLXD_SOCKET"

SUN_PATH_BYTES = 108 if sys.platform.startswith("linux") else 104
"""``sizeof(sockaddr_un.sun_path)``: 108 on Linux, 104 on macOS and the BSDs. The path and
its terminating NUL must fit, so a path may have one byte less."""


def default_socket_path() -> Path:
    if env := os.environ.get(SOCKET_ENV):
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlxd" / "mlxd.sock"
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "mlxd" / "mlxd.sock"
    return Path(f"/tmp/mlxd-{os.getuid()}") / "mlxd.sock"


def socket_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a Unix socket's address (one line naming it, its length and
    the limit), or None if it can."""
    length = len(os.fsencode(path))
    if length < SUN_PATH_BYTES:
        return None
    return (
        f"the socket path {os.fspath(path)} is {length} bytes; a Unix socket's path may have "
        f"at most {SUN_PATH_BYTES - 1} on this platform ({SUN_PATH_BYTES} with its terminating NUL)"
    )
