"""Starting, waiting for and stopping the servers the benchmarks compare, side by side:
mlxd (over its Unix socket) and mlx_lm's server (over loopback HTTP). Shared by the
scripts in bench/; nothing here is measured.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def start_mlxd(
    work: Path,
    model_dir: Path,
    name: str,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    """``extra``: more ``serve`` flags (``--http 127.0.0.1:PORT``, say); ``env``: variables
    the daemon gets on top of this process's (``MLXD_PROFILE_ROUNDS``, say)."""
    sock = work / "mlxd.sock"
    cmd = [
        sys.executable, "-m", "mlxd.daemon", "serve",
        "--socket", str(sock),
        "--model", f"{name}={model_dir}",
        "--state-dir", str(work / "state"),
        "--no-cache-persist",
        "--log-level", "warning",
        # This process's own BLAS, which mlx_lm's server and the in-process runs share: the
        # daemon would otherwise preload OpenBLAS itself (bench/blas_regime.py).
        "--blas", "bundled",
        *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, **env} if env else None), sock


def start_mlx_lm(work: Path, model_dir: Path, port: int) -> subprocess.Popen[bytes]:
    log = (work / "mlx_lm_server.log").open("wb")
    # `python -m mlx_lm server` runs the same main() as the deprecated `-m mlx_lm.server`
    # (which only adds a deprecation notice).
    cmd = [
        sys.executable, "-m", "mlx_lm", "server",
        "--model", str(model_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--log-level", "WARNING",
    ]  # fmt: skip
    # Offline: the model is a local directory, and nothing may leave this machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_mlxd(sock: Path, process: subprocess.Popen[bytes]) -> None:
    from mlxd.client import Client, DaemonUnavailableError

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with Client(sock) as c:
                c.ping()
                return
        except (DaemonUnavailableError, OSError):
            time.sleep(0.05)
    raise RuntimeError("mlxd did not start")


def wait_http(port: int, process: subprocess.Popen[bytes]) -> None:

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlx_lm server exited with status {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            if ok:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("mlx_lm server did not answer /health within 120 s")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()  # ours, by handle: never by name
        process.wait(10)


def revision() -> dict[str, Any]:
    """The commit measured, and the daemon's files changed since: results depend on both."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.rstrip()

    try:
        dirty = git("status", "--porcelain", "--", "daemon", "protocol", "clients")
        return {"commit": git("rev-parse", "HEAD"), "changed": dirty.splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "changed": []}
