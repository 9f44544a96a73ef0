"""Where the daemon's socket lives by default: part of the contract, since every client
(the Python client, editor plugins) must find it without being told.

Order: ``$MLXD_SOCKET``; on macOS ``~/Library/Application Support/mlxd/mlxd.sock``; elsewhere
``$XDG_RUNTIME_DIR/mlxd/mlxd.sock``, or ``/tmp/mlxd-$UID/mlxd.sock`` without a runtime dir.

Threading: pure functions; any thread.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SOCKET_ENV = "MLXD_SOCKET"


def default_socket_path() -> Path:
    if env := os.environ.get(SOCKET_ENV):
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlxd" / "mlxd.sock"
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "mlxd" / "mlxd.sock"
    return Path(f"/tmp/mlxd-{os.getuid()}") / "mlxd.sock"
