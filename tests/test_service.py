"""Running as a service: the LaunchAgent plist, the systemd units, ``mlxd service``, and
socket activation (a real daemon serving a socket it did not make).
"""

from __future__ import annotations

import os
import plistlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import Daemon, short_tmpdir, wait_ready
from helpers import reference

from mlxd.client import Chunk
from mlxd.daemon import service
from mlxd.daemon.transport import LAUNCHD_SOCKET_NAME, inherited_socket, running_pid

REPO = Path(__file__).resolve().parent.parent


def mlxd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("MLXD_SOCKET", "XDG_CONFIG_HOME")}
    return subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", *args],
        capture_output=True, text=True, timeout=60, env={**base, **(env or {})},
    )  # fmt: skip


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- launchd


def test_plist_holds_the_keys_with_absolute_paths_under_home(tmp_path: Path) -> None:
    out = mlxd("service", "install", "--platform", "macos", "--files-only", "--home", str(tmp_path))
    assert out.returncode == 0, out.stderr
    plist_path = tmp_path / "Library" / "LaunchAgents" / "dev.mlxd.plist"
    with plist_path.open("rb") as f:
        plist = plistlib.load(f)

    assert plist["Label"] == "dev.mlxd"
    program = plist["ProgramArguments"]
    assert isinstance(program, list) and program[1:] == ["serve"]
    assert Path(program[0]).is_absolute() and os.access(program[0], os.X_OK)
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ProcessType"] == "Interactive"
    logs = tmp_path / "Library" / "Logs" / "mlxd"
    assert Path(plist["StandardOutPath"]).parent == logs
    assert Path(plist["StandardErrorPath"]).parent == logs
    assert logs.is_dir()  # launchd opens the files but makes no folders
    env = plist["EnvironmentVariables"]
    assert isinstance(env, dict) and all(isinstance(v, str) for v in env.values())

    sock = plist["Sockets"][LAUNCHD_SOCKET_NAME]
    assert sock["SockPathMode"] == 384 == 0o600 and type(sock["SockPathMode"]) is int
    assert sock["SockType"] == "stream" and sock["SockFamily"] == "Unix"
    sock_path = Path(sock["SockPathName"])
    assert sock_path == tmp_path / "Library" / "Application Support" / "mlxd" / "mlxd.sock"
    assert env["MLXD_SOCKET"] == str(sock_path)  # the daemon and its clients agree
    assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
    # launchd expands neither ~ nor $VAR: nothing relative, nothing left to expand.
    raw = plist_path.read_text()
    assert "~" not in raw and "$" not in raw
    for path in (program[0], plist["StandardOutPath"], plist["StandardErrorPath"], sock_path):
        assert Path(path).is_absolute()


@pytest.mark.parametrize("platform", ["macos", "linux"])
def test_install_twice_leaves_the_files_byte_identical_and_untouched(
    tmp_path: Path, platform: str
) -> None:
    args = ("service", "install", "--platform", platform, "--files-only", "--home", str(tmp_path))
    assert mlxd(*args).returncode == 0
    first = {
        p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in files_under(tmp_path)
    }
    assert first
    again = mlxd(*args)
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout
    second = {
        p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in files_under(tmp_path)
    }
    assert second == first  # same bytes, and not even rewritten


def test_dry_run_plans_launchctl_and_runs_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    uid = os.getuid()
    plist = home / "Library" / "LaunchAgents" / "dev.mlxd.plist"
    target = f"gui/{uid}/dev.mlxd"

    def plan(action: str) -> str:
        # On Linux there is no launchctl: had anything run, this would fail.
        out = mlxd("service", action, "--platform", "macos", "--dry-run", "--home", str(home))
        assert out.returncode == 0, out.stderr
        return out.stdout

    install = plan("install")
    assert f"$ launchctl bootstrap gui/{uid} {plist}" in install
    assert f"$ launchctl print {target}" in install
    assert "<key>Sockets</key>" in install  # the file it would write, shown whole
    assert f"$ launchctl kickstart {target}" in plan("start")
    assert f"$ launchctl bootout {target}" in plan("stop")
    assert f"$ launchctl bootout {target}" in plan("uninstall")
    assert f"$ launchctl print {target}" in plan("status")
    assert "$ tail -n 100 " in plan("logs")
    assert list(home.rglob("*")) == []  # nothing written, no folder made


FAKE_LAUNCHCTL = """#!/bin/sh
# Records each call; remembers whether the job is loaded, as launchd would.
echo "$*" >> "$FAKE_DIR/calls"
case "$1" in
    print) [ -e "$FAKE_DIR/loaded" ] ;;
    bootstrap) touch "$FAKE_DIR/loaded" ;;
    bootout) rm -f "$FAKE_DIR/loaded" ;;
    kickstart) [ -e "$FAKE_DIR/loaded" ] ;;
esac
"""


def test_install_loads_once_and_reloads_only_a_changed_plist(tmp_path: Path) -> None:
    # A stand-in launchctl on PATH: the real command path runs, and we read what it called.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "launchctl").write_text(FAKE_LAUNCHCTL)
    (fake / "launchctl").chmod(0o755)
    home = tmp_path / "home"
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)}
    calls = tmp_path / "calls"
    target = f"gui/{os.getuid()}/dev.mlxd"
    plist = home / "Library" / "LaunchAgents" / "dev.mlxd.plist"

    def do(*args: str) -> list[str]:
        calls.write_text("")
        out = mlxd("service", *args, "--platform", "macos", "--home", str(home), env=env)
        assert out.returncode == 0, out.stderr
        return calls.read_text().splitlines()

    assert do("install") == [f"print {target}", f"bootstrap gui/{os.getuid()} {plist}"]
    assert do("install") == [f"print {target}"]  # unchanged and loaded: nothing to do
    assert do("install", "--serve-args=--keep-alive -1") == [
        f"print {target}",
        f"bootout {target}",
        f"bootstrap gui/{os.getuid()} {plist}",
    ]
    assert do("stop") == [f"print {target}", f"bootout {target}"]
    assert do("start") == [
        f"print {target}",
        f"bootstrap gui/{os.getuid()} {plist}",
        f"kickstart {target}",
    ]
    assert do("uninstall") == [f"print {target}", f"bootout {target}"]
    assert not plist.exists()


# ---------------------------------------------------------------------------- systemd


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections and their (key, value) lines; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit file line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def test_systemd_units_hold_the_required_settings(tmp_path: Path) -> None:
    out = mlxd("service", "install", "--platform", "linux", "--files-only", "--home", str(tmp_path))
    assert out.returncode == 0, out.stderr
    unit_dir = tmp_path / ".config" / "systemd" / "user"
    sock = parse_unit((unit_dir / "mlxd.socket").read_text())
    svc = parse_unit((unit_dir / "mlxd.service").read_text())

    assert set(sock) == {"Unit", "Socket", "Install"}
    socket_keys = dict(sock["Socket"])
    assert socket_keys["ListenStream"] == "%t/mlxd/mlxd.sock"  # $XDG_RUNTIME_DIR/mlxd/mlxd.sock
    assert socket_keys["SocketMode"] == "0600"
    assert socket_keys["DirectoryMode"] == "0700"
    assert ("WantedBy", "sockets.target") in sock["Install"]

    assert set(svc) == {"Unit", "Service"}  # started by its socket, never enabled alone
    assert ("Requires", "mlxd.socket") in svc["Unit"]
    service_keys = dict(svc["Service"])
    program = service_keys["ExecStart"].split()
    assert Path(program[0]).is_absolute() and os.access(program[0], os.X_OK)
    assert program[1:] == ["serve"]
    assert service_keys["Restart"] == "on-failure"
    assert ("Environment", "MLXD_SOCKET=%t/mlxd/mlxd.sock") in svc["Service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = mlxd("service", "install", "--platform", "linux", "--files-only", "--home", str(home))
    assert out.returncode == 0, out.stderr
    unit_dir = home / ".config" / "systemd" / "user"
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    check = subprocess.run(
        ["systemd-analyze", "--user", "verify",
         str(unit_dir / "mlxd.socket"), str(unit_dir / "mlxd.service")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(home)},
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    # Unknown keys are only warned about: any warning is a mistake in the units.
    assert "mlxd." not in check.stderr, check.stderr


def test_dry_run_plans_systemctl(tmp_path: Path) -> None:
    out = mlxd("service", "install", "--platform", "linux", "--dry-run", "--home", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "$ systemctl --user daemon-reload" in out.stdout
    assert "$ systemctl --user enable --now mlxd.socket" in out.stdout
    assert "ListenStream=%t/mlxd/mlxd.sock" in out.stdout
    logs = mlxd("service", "logs", "--platform", "linux", "--dry-run", "--home", str(tmp_path))
    assert "$ journalctl --user -u mlxd.service" in logs.stdout
    assert list(tmp_path.rglob("*")) == []


def test_install_reloads_systemd_only_when_a_unit_changed(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "systemctl").write_text('#!/bin/sh\necho "$*" >> "$FAKE_DIR/calls"\n')
    (fake / "systemctl").chmod(0o755)
    home = tmp_path / "home"
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)}
    calls = tmp_path / "calls"

    def do(*args: str) -> list[str]:
        calls.write_text("")
        out = mlxd("service", *args, "--platform", "linux", "--home", str(home), env=env)
        assert out.returncode == 0, out.stderr
        return calls.read_text().splitlines()

    assert do("install") == ["--user daemon-reload", "--user enable --now mlxd.socket"]
    assert do("install") == ["--user enable --now mlxd.socket"]  # nothing changed
    assert do("stop") == ["--user stop mlxd.socket mlxd.service"]
    assert do("start") == ["--user start mlxd.socket mlxd.service"]
    assert do("uninstall") == [
        "--user disable --now mlxd.socket",
        "--user stop mlxd.service",
        "--user daemon-reload",
    ]
    assert not (home / ".config" / "systemd" / "user" / "mlxd.socket").exists()


def test_the_example_files_are_what_install_writes() -> None:
    mac = service.example_target("macos")
    assert (REPO / "launchd" / "dev.mlxd.plist.example").read_bytes() == service.render_plist(mac)
    for path, data in service.example_target("linux").files():
        assert (REPO / "launchd" / "systemd" / path.name).read_bytes() == data, (
            "regenerate: python -c 'from mlxd.daemon.service import write_examples; "
            'write_examples("launchd")\''
        )


# ---------------------------------------------------------------------------- activation


# What systemd does between fork and exec: the socket becomes fd 3, LISTEN_PID our own pid.
EXEC_WITH_FD3 = (
    "import os, sys; fd = int(sys.argv[1]); "
    "fd == 3 or (os.dup2(fd, 3), os.close(fd)); "
    "os.environ['LISTEN_PID'] = str(os.getpid()); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def start_activated(sock: socket.socket, model: Path, state: Path) -> Daemon:
    """``mlxd serve`` with ``sock`` as fd 3, LISTEN_FDS=1 and LISTEN_PID its own pid."""
    fd = sock.fileno()
    log_fd, log_name = tempfile.mkstemp(prefix="mlxd-daemon-", suffix=".log")
    cmd = [
        sys.executable, "-c", EXEC_WITH_FD3, str(fd),
        sys.executable, "-m", "mlxd.daemon", "serve", "--model", f"tiny={model}",
        "--state-dir", str(state), "--log-format", "json",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLXD_SOCKET"}
    proc = subprocess.Popen(
        cmd, stdout=log_fd, stderr=subprocess.STDOUT, pass_fds=(fd,), env={**env, "LISTEN_FDS": "1"}
    )
    os.close(log_fd)
    return Daemon(Path(sock.getsockname()), proc, Path(log_name))


def test_socket_activation_serves_a_socket_it_did_not_make(tiny_model: Path) -> None:
    base = short_tmpdir()
    path = base / "mlxd.sock"
    # What systemd does: bind and listen, then pass the fd. An unusual mode on purpose:
    # the daemon must not chmod it to its own 0600.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    os.chmod(path, 0o660)
    try:
        d = start_activated(sock, tiny_model, base / "state")
        try:
            wait_ready(d)
            with d.client() as client:
                chunks = list(client.stream("def f():", max_tokens=12))
            *streamed, done = chunks
            assert len(streamed) > 1 and all(isinstance(c, Chunk) for c in streamed)
            assert done.finish_reason == "length"
            assert "".join(c.text for c in streamed) == reference(tiny_model, "def f():", 12)[0]
            assert running_pid(path) == d.proc.pid  # the single-instance lock is still taken
            assert '"manager": "systemd"' in d.log()
        finally:
            assert d.stop(signal.SIGTERM) == 0, d.log()
        # The manager's socket outlives the daemon: there, with its mode, still listening.
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        # ...so the next daemon (a restart) serves it again.
        again = start_activated(sock, tiny_model, base / "state")
        try:
            wait_ready(again)
        finally:
            assert again.stop(signal.SIGTERM) == 0, again.log()
        assert path.exists()
    finally:
        sock.close()
        shutil.rmtree(base, ignore_errors=True)


def test_activation_with_a_fd_that_is_no_socket_fails_clearly(tiny_model: Path) -> None:
    base = short_tmpdir()
    with open(base / "not-a-socket", "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-c", EXEC_WITH_FD3, str(f.fileno()),
             sys.executable, "-m", "mlxd.daemon", "serve", "--model", f"tiny={tiny_model}",
             "--socket", str(base / "mlxd.sock")],
            capture_output=True, text=True, timeout=60, pass_fds=(f.fileno(),),
            env={**os.environ, "LISTEN_FDS": "1"},
        )  # fmt: skip
    assert proc.returncode == 1
    assert "mlxd: error: activation_failed:" in proc.stderr
    assert not (base / "mlxd.sock").exists()  # nor did it fall back to binding its own
    shutil.rmtree(base)


def test_listen_fds_meant_for_another_process_are_ignored_and_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDNAMES", "mlxd.socket")
    assert inherited_socket() is None
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        assert name not in os.environ  # no child of ours may take them for its own


# ---------------------------------------------------------------------------- --http


def test_install_http_writes_it_into_the_plist_serve_arguments(tmp_path: Path) -> None:
    out = mlxd(
        "service", "install", "--platform", "macos", "--files-only", "--home", str(tmp_path),
        "--http", "127.0.0.1:8642", "--api-key-file", "~/.config/mlxd/api-key",
        "--serve-args", "--keep-alive -1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    with (tmp_path / "Library" / "LaunchAgents" / "dev.mlxd.plist").open("rb") as f:
        program = plistlib.load(f)["ProgramArguments"]
    key = str(tmp_path / ".config" / "mlxd" / "api-key")  # launchd expands no ~
    assert program[1:] == [
        "serve", "--keep-alive", "-1", "--http", "127.0.0.1:8642", "--api-key-file", key,
    ]  # fmt: skip


def test_install_http_writes_it_into_the_systemd_unit(tmp_path: Path) -> None:
    out = mlxd(
        "service", "install", "--platform", "linux", "--dry-run", "--home", str(tmp_path),
        "--http", "unix:~/mlxd http/h.sock",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not files_under(tmp_path)  # a dry run writes nothing
    exec_start = next(x for x in out.stdout.splitlines() if x.startswith("ExecStart="))
    assert exec_start.endswith(f' serve --http "unix:{tmp_path}/mlxd http/h.sock"')

    out = mlxd(
        "service", "install", "--platform", "linux", "--files-only", "--home", str(tmp_path),
        "--http", "[::1]:8642",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    unit = (tmp_path / ".config" / "systemd" / "user" / "mlxd.service").read_text()
    assert dict(parse_unit(unit)["Service"])["ExecStart"].split()[1:] == [
        "serve", "--http", '"[::1]:8642"',  # quoted: systemd reads it back unquoted
    ]  # fmt: skip


def test_install_http_refuses_what_is_no_address(tmp_path: Path) -> None:
    for bad in ("8642", "localhost", "unix:relative.sock"):
        out = mlxd("service", "install", "--platform", "linux", "--dry-run",
                   "--home", str(tmp_path), "--http", bad)  # fmt: skip
        assert out.returncode == 1, bad
        assert out.stderr.startswith("mlxd: error: invalid_argument:"), out.stderr
