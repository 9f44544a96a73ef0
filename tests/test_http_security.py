"""Who may use the HTTP API: loopback or ``unix:PATH`` unless an API key is configured; a
bind beyond loopback without one is refused at start; with a key, 401 without it; on
Linux, a loopback peer of another user id gets 403 unless it presents the key."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Daemon, HttpDaemon, free_port, short_tmpdir, start_daemon, start_http_daemon

KEY = "mlxd-test-key-0123456789"


def key_file(mode: int = 0o600, key: str = KEY) -> Path:
    path = Path(tempfile.mkdtemp(prefix="mlxd-key-")) / "key"
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    """``mlxd serve`` that is expected to refuse to start."""
    sock = short_tmpdir() / "mlxd.sock"
    fd, config = tempfile.mkstemp(suffix=".toml")
    os.close(fd)
    cmd = [sys.executable, "-m", "mlxd.daemon", "serve", "--socket", str(sock), *args]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "MLXD_CONFIG": config}
    )
    assert not sock.exists(), "refused, yet the native socket was bound"
    return out


def refusal(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, out
    errors = [line for line in out.stderr.splitlines() if line.startswith("mlxd: error:")]
    assert len(errors) == 1, out.stderr
    return errors[0]


def test_a_bind_beyond_loopback_without_a_key_is_refused_before_binding() -> None:
    port = free_port()
    line = refusal(serve("--http", f"0.0.0.0:{port}"))
    assert line.startswith("mlxd: error: http_refused:") and "0.0.0.0" in line
    assert "api_key_file" in line
    with socket.socket() as s:  # nothing listens there
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_port_already_taken_is_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refusal(serve("--http", f"127.0.0.1:{port}"))
    assert line.startswith("mlxd: error: http_refused:") and f"127.0.0.1:{port}" in line


def test_a_key_file_others_can_read_or_not_ours_is_refused() -> None:
    port = free_port()
    loose = key_file(0o644)
    line = refusal(serve("--http", f"0.0.0.0:{port}", "--api-key-file", str(loose)))
    assert "0644" in line and "chmod 600" in line
    line = refusal(serve("--http", f"127.0.0.1:{port}", "--api-key-file", str(loose)))
    assert "0644" in line
    if os.getuid() == 0:
        theirs = key_file()
        os.chown(theirs, 65534, 65534)
        line = refusal(serve("--http", f"127.0.0.1:{port}", "--api-key-file", str(theirs)))
        assert "uid 65534" in line
    missing = refusal(serve("--http", f"127.0.0.1:{port}", "--api-key-file", "/nonexistent/k"))
    assert "/nonexistent/k" in missing


@pytest.fixture(scope="module")
def keyed(tiny_model: Path) -> Iterator[HttpDaemon]:
    path = key_file()
    d = start_http_daemon(
        "--api-key-file", str(path), "--model", f"tiny={tiny_model}", "--default-model", "tiny"
    )
    yield d
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    shutil.rmtree(path.parent, ignore_errors=True)
    assert code == 0, d.log()


def test_with_a_key_a_missing_or_wrong_one_is_401_and_the_right_one_serves(
    keyed: HttpDaemon,
) -> None:
    with httpx.Client(base_url=keyed.base_url, timeout=60) as http:
        r = http.get("/v1/models")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "wrong" in r.json()["error"]["message"]
        r = http.get("/api/version")
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
        r = http.post("/v1/messages", json={})
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        r = http.get("/no/such/endpoint")  # the key first: no map of what is served
        assert r.status_code == 401

        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).is_success
        assert http.get("/api/version", headers={"x-api-key": KEY}).is_success
    sdk = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEY)
    assert [m.id for m in sdk.models.list()] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="nope").models.list()


def test_with_a_key_a_bind_beyond_loopback_serves(tiny_model: Path) -> None:
    path, port = key_file(), free_port()
    d = start_daemon(
        short_tmpdir() / "mlxd.sock", "--http", f"0.0.0.0:{port}", "--api-key-file", str(path),
        "--model", f"tiny={tiny_model}",
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url, timeout=60).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60).is_success
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(d.socket.parent, ignore_errors=True)


def test_http_over_a_unix_socket_is_private(tiny_model: Path) -> None:
    folder = short_tmpdir() / "http"
    path = folder / "h.sock"
    d: Daemon = start_daemon(
        short_tmpdir() / "mlxd.sock", "--http", f"unix:{path}", "--model", f"tiny={tiny_model}"
    )
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=60) as http:
            r = http.get("http://mlxd/v1/models")
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    finally:
        assert d.stop() == 0, d.log()
    assert not path.exists()
    shutil.rmtree(d.socket.parent, ignore_errors=True)


def as_nobody(url: str, *headers: str) -> int:
    """The status ``curl`` gets for ``url`` running as user nobody (uid 65534)."""
    argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "curl", "-s"]
    for h in headers:
        argv += ["-H", h]
    argv += ["-o", "/dev/null", "-w", "%{http_code}", url]
    # Without the suite's preloaded OpenBLAS (./dev test): its worker thread makes setpriv
    # a threaded process; setpriv keeps its capabilities through the uid change on its own
    # thread only, so glibc's relay of the gid change fails on OpenBLAS's, and glibc
    # aborts (SIGABRT). curl needs no BLAS.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


nobody = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or os.getuid() != 0
    or not (shutil.which("setpriv") and shutil.which("curl")),
    reason="needs Linux, root (to run a client as nobody), setpriv and curl",
)


@nobody
def test_another_user_on_loopback_is_refused_without_a_key(http_daemon: HttpDaemon) -> None:
    url = f"{http_daemon.base_url}/v1/models"
    assert as_nobody(url) == 403
    assert as_nobody(url, "Authorization: Bearer anything") == 403  # no key configured
    assert httpx.get(url, timeout=60).status_code == 200  # our own uid


@nobody
def test_another_user_on_loopback_with_the_key_is_served(keyed: HttpDaemon) -> None:
    url = f"{keyed.base_url}/v1/models"
    assert as_nobody(url) == 403
    assert as_nobody(url, "Authorization: Bearer wrong") == 401
    assert as_nobody(url, f"Authorization: Bearer {KEY}") == 200
    assert as_nobody(url, f"x-api-key: {KEY}") == 200
