"""Shared fixtures: tiny models built by the project's own builder, and real daemons.

Every daemon here is a real ``mlxd serve`` subprocess on a real Unix socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlxd.client import Client, DaemonUnavailableError

# Every daemon (and every other process) a test starts runs exactly this process's BLAS,
# inheriting its LD_PRELOAD if it has one, and never picks one of its own: the
# greedy-equality tests compare daemons with mlx-lm computed here, and two BLAS libraries
# may round differently (see daemon/blas.py). tests/test_blas.py sets it per daemon.
os.environ["MLXD_BLAS"] = "bundled"


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_root: Path) -> Path:
    from mlxd.daemon.demo_model import build_demo_model

    return build_demo_model(models_root / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(models_root: Path) -> Path:
    """A second model: same shapes and tokenizer, other weights."""
    from mlxd.daemon.demo_model import build_demo_model

    return build_demo_model(models_root / "tiny-b", size="tiny", seed=1)


@pytest.fixture(scope="session")
def qwen3_model(models_root: Path) -> Path:
    """Tiny, with Qwen3's thinking markers and Qwen3-Coder's XML tool calls (mlx-lm's
    ``qwen3_coder`` parser)."""
    from mlxd.daemon.demo_model import build_demo_model

    return build_demo_model(models_root / "tiny-qwen3", size="tiny", markers="qwen3")


@pytest.fixture(scope="session")
def hermes_model(models_root: Path) -> Path:
    """Tiny, with Hermes' JSON tool calls (mlx-lm's ``json_tools`` parser), no thinking."""
    from mlxd.daemon.demo_model import build_demo_model

    return build_demo_model(models_root / "tiny-hermes", size="tiny", markers="hermes")


def short_tmpdir() -> Path:
    # AF_UNIX paths are limited to ~104 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="mlxd-", dir="/tmp"))


@dataclass
class Daemon:
    socket: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    def client(self, **kwargs: object) -> Client:
        return Client(self.socket, timeout=60, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_daemon(
    socket: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True
) -> Daemon:
    fd, name = tempfile.mkstemp(prefix="mlxd-daemon-", suffix=".log")
    os.close(fd)
    log_path = Path(name)
    cmd = [
        sys.executable,
        "-m",
        "mlxd.daemon",
        "serve",
        "--socket",
        str(socket),
        "--log-format",
        "json",
        "--state-dir",
        str(socket.parent / "state"),
        *args,
    ]
    # An empty configuration file: the developer's own ~/.config/mlxd/config.toml stays out.
    fd, config = tempfile.mkstemp(prefix="mlxd-config-", suffix=".toml")
    os.close(fd)
    env = {**os.environ, "MLXD_CONFIG": config, **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    daemon = Daemon(socket, proc, log_path, list(args))
    if wait:
        wait_ready(daemon)
    return daemon


def wait_ready(daemon: Daemon, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {daemon.proc.returncode}:\n{daemon.log()}")
        try:
            with daemon.client() as c:
                c.ping()
                return
        except (DaemonUnavailableError, OSError):
            time.sleep(0.05)
    raise TimeoutError(f"daemon not ready:\n{daemon.log()}")


@pytest.fixture(scope="session")
def daemon(tiny_model: Path, tiny_model_b: Path) -> Iterator[Daemon]:
    """One daemon for the read-mostly tests, serving both tiny models."""
    d = start_daemon(
        short_tmpdir() / "mlxd.sock",
        "--model",
        f"tiny={tiny_model}",
        "--model",
        f"tiny-b={tiny_model_b}",
        "--default-model",
        "tiny",
    )
    yield d
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert code == 0, d.log()


def wait_idle(client: Client, timeout: float = 10) -> None:
    """Until nothing is in flight: cancels are asynchronous by nature."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.stats()
        # This client's own stats request is the one in flight.
        if s.active_sequences == 0 and s.requests_in_flight <= 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"daemon not idle: {client.stats()}")


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HttpDaemon(Daemon):
    base_url: str = ""
    """``http://127.0.0.1:PORT``: the HTTP API's root."""


def start_http_daemon(*args: str, env: dict[str, str] | None = None) -> HttpDaemon:
    """A real daemon with its HTTP API on a free loopback port, and its native socket."""
    port = free_port()
    d = start_daemon(short_tmpdir() / "mlxd.sock", "--http", f"127.0.0.1:{port}", *args, env=env)
    return HttpDaemon(d.socket, d.proc, d.log_path, d.args, base_url=f"http://127.0.0.1:{port}")


@pytest.fixture(scope="session")
def tools_daemon(hermes_model: Path, qwen3_model: Path, tiny_model: Path) -> Iterator[HttpDaemon]:
    """One HTTP-serving daemon for the tool-call tests: both marker models, and the plain
    tiny one (no tool calling)."""
    d = start_http_daemon(
        "--model", f"hermes={hermes_model}", "--model", f"qwen3={qwen3_model}",
        "--model", f"tiny={tiny_model}", "--default-model", "hermes",
    )  # fmt: skip
    yield d
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert code == 0, d.log()


@pytest.fixture(scope="session")
def http_daemon(tiny_model: Path, tiny_model_b: Path) -> Iterator[HttpDaemon]:
    """One HTTP-serving daemon for the read-mostly HTTP tests, both tiny models."""
    d = start_http_daemon(
        "--model", f"tiny={tiny_model}", "--model", f"tiny-b={tiny_model_b}",
        "--default-model", "tiny",
    )  # fmt: skip
    yield d
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert code == 0, d.log()
