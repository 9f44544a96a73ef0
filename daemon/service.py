"""``mlxd service``: run mlxd under the system's service manager, socket-activated.

macOS: a LaunchAgent plist in ``~/Library/LaunchAgents/``, driven with ``launchctl
bootstrap|bootout|kickstart|print gui/$UID/dev.mlxd``. Linux: a systemd user ``.socket`` +
``.service`` pair in ``~/.config/systemd/user/``, driven with ``systemctl --user`` and read
with ``journalctl --user``. The platform is the one we run on unless ``--platform`` says
otherwise, and ``--dry-run`` prints the files and commands instead of writing and running
them (that is how the launchctl side is checked on Linux).

Either manager owns the socket (mode 0600) and hands it to ``mlxd serve`` (see
``transport.inherited_socket``): a client's first connection starts the daemon, and the
manager restarts it when it fails (exit status not 0). A clean exit (SIGTERM, ``mlxd stop``)
is not restarted until the next connection.

launchd expands neither ``~`` nor ``$VAR``: every path written here is absolute.

Threading: the main thread only (a CLI command).
"""

from __future__ import annotations

import argparse
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .transport import LAUNCHD_SOCKET_NAME

LABEL = "dev.mlxd"
"""The LaunchAgent's label (and the plist's file name)."""
UNIT = "mlxd"
"""The systemd units' name: ``mlxd.socket`` and ``mlxd.service``."""
ACTIONS = ("install", "uninstall", "start", "stop", "status", "logs")
PLATFORMS = ("macos", "linux")
SOCKET_MODE = 0o600
EXIT_TIMEOUT_S = 60
"""How long the manager waits after SIGTERM before SIGKILL: saving the prompt cache."""
_HEADER = "# Written by `mlxd service install`; the next install overwrites edits.\n"
# AF_UNIX path limit: sizeof(sun_path) is 104 on macOS, 108 on Linux, both with the NUL.
_MAX_SOCKET_PATH = 103


class ServiceError(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Target:
    """Everything the files depend on: where they go and what they run."""

    platform: str
    home: Path
    uid: int
    program: tuple[str, ...]
    """The command that runs mlxd (absolute), before ``serve``."""
    socket: str
    """The socket path: absolute, or on Linux ``%t/...`` (systemd's runtime-dir specifier)."""
    serve_args: tuple[str, ...] = ()
    config_home: Path | None = None
    """``$XDG_CONFIG_HOME`` (Linux); None: ``<home>/.config``."""

    @property
    def plist_path(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    @property
    def log_dir(self) -> Path:
        return self.home / "Library" / "Logs" / "mlxd"

    @property
    def unit_dir(self) -> Path:
        return (self.config_home or self.home / ".config") / "systemd" / "user"

    @property
    def domain(self) -> str:
        return f"gui/{self.uid}"

    @property
    def service_target(self) -> str:
        return f"{self.domain}/{LABEL}"

    def files(self) -> list[tuple[Path, bytes]]:
        if self.platform == "macos":
            return [(self.plist_path, render_plist(self))]
        return [
            (self.unit_dir / f"{UNIT}.socket", render_socket_unit(self).encode()),
            (self.unit_dir / f"{UNIT}.service", render_service_unit(self).encode()),
        ]


# ---------------------------------------------------------------------------- the files


def plist_dict(t: Target) -> dict[str, Any]:
    return {
        "Label": LABEL,
        "ProgramArguments": [*t.program, "serve", *t.serve_args],
        "RunAtLoad": True,
        # Restarted when it fails; after a clean exit the socket still starts it on demand.
        "KeepAlive": {"SuccessfulExit": False},
        # Interactive: not throttled like a background job; the user is waiting on its replies.
        "ProcessType": "Interactive",
        "ExitTimeOut": EXIT_TIMEOUT_S,
        "StandardOutPath": str(t.log_dir / "mlxd.out.log"),
        "StandardErrorPath": str(t.log_dir / "mlxd.log"),
        "EnvironmentVariables": {"MLXD_SOCKET": t.socket, "PYTHONUNBUFFERED": "1"},
        "Sockets": {
            LAUNCHD_SOCKET_NAME: {
                "SockFamily": "Unix",
                "SockType": "stream",
                "SockPathName": t.socket,
                "SockPathMode": SOCKET_MODE,  # an integer: 384, which plists show in decimal
            }
        },
    }


def render_plist(t: Target) -> bytes:
    return plistlib.dumps(plist_dict(t), fmt=plistlib.FMT_XML, sort_keys=True)


def validate_plist(data: bytes, expected: dict[str, Any] | None = None) -> None:
    """``plistlib`` round-trip always; ``plutil -lint`` where it exists (macOS)."""
    try:
        parsed = plistlib.loads(data)
    except Exception as exc:
        raise ServiceError("invalid_plist", f"the plist does not parse: {exc}") from exc
    if expected is not None and parsed != expected:
        raise ServiceError("invalid_plist", "the plist does not read back as it was written")
    plutil = shutil.which("plutil")
    if plutil is None:
        return
    with tempfile.NamedTemporaryFile(suffix=".plist") as f:
        f.write(data)
        f.flush()
        lint = subprocess.run([plutil, "-lint", f.name], capture_output=True, text=True)
    if lint.returncode != 0:
        raise ServiceError("invalid_plist", f"plutil -lint: {lint.stdout.strip()}")


def _sd_escape(text: str) -> str:
    """A literal value for a unit file: ``%`` would start a specifier."""
    return text.replace("%", "%%")


def _sd_quote(arg: str, *, specifiers: bool = False) -> str:
    """One ExecStart= word: systemd splits on spaces and expands ``$VAR`` and ``%x``."""
    if not specifiers:
        arg = _sd_escape(arg)
    arg = arg.replace("$", "$$")
    if re.fullmatch(r"[\w@%+=:,./-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sd_socket(t: Target) -> str:
    return t.socket if t.socket.startswith("%t/") else _sd_escape(t.socket)


def render_socket_unit(t: Target) -> str:
    return (
        f"{_HEADER}"
        "[Unit]\n"
        "Description=mlxd socket: the local LLM daemon starts on the first connection\n"
        "\n"
        "[Socket]\n"
        f"ListenStream={_sd_socket(t)}\n"
        f"SocketMode={SOCKET_MODE:04o}\n"
        "DirectoryMode=0700\n"
        "\n"
        "[Install]\n"
        "WantedBy=sockets.target\n"
    )


def render_service_unit(t: Target) -> str:
    command = [_sd_quote(a) for a in (*t.program, "serve", *t.serve_args)]
    return (
        f"{_HEADER}"
        "[Unit]\n"
        "Description=mlxd: local LLM inference daemon on MLX\n"
        f"Requires={UNIT}.socket\n"
        f"After={UNIT}.socket\n"
        "\n"
        "[Service]\n"
        f"ExecStart={' '.join(command)}\n"
        f"Environment={_sd_quote('MLXD_SOCKET=' + _sd_socket(t), specifiers=True)}\n"
        "Environment=PYTHONUNBUFFERED=1\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        f"TimeoutStopSec={EXIT_TIMEOUT_S}\n"
    )


# ---------------------------------------------------------------------------- the target


def current_platform() -> str:
    if sys.platform == "darwin":
        return "macos"
    if sys.platform.startswith("linux"):
        return "linux"
    raise ServiceError("unsupported_platform", f"no service manager support on {sys.platform}")


def default_program() -> tuple[str, ...]:
    """The ``mlxd`` beside this interpreter (a venv's bin), else on PATH, else ``-m``."""
    # absolute(), not resolve(): a venv's python is a symlink out of the venv.
    beside = Path(sys.executable).absolute().parent / "mlxd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return (str(beside),)
    found = shutil.which("mlxd")
    if found:
        return (str(Path(found).absolute()),)
    return (str(Path(sys.executable).absolute()), "-m", "mlxd.daemon")


def _absolute(text: str, home: Path, what: str) -> str:
    path = home / text[2:] if text == "~" or text.startswith("~/") else Path(text)
    if not path.is_absolute():
        raise ServiceError("invalid_argument", f"{what} must be an absolute path: {text!r}")
    return str(path)


_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}")


def http_args(http: str | None, api_key_file: str | None, home: Path) -> list[str]:
    """``--http`` (``HOST:PORT``, or ``unix:PATH`` made absolute) and ``--api-key-file``
    (absolute) for ``mlxd serve``; whether a bind needs a key, the daemon says at start."""
    args: list[str] = []
    if http:
        if http.startswith("unix:"):
            http = "unix:" + _absolute(http[5:], home, "the HTTP socket")
        elif not _HOST_PORT.fullmatch(http):
            raise ServiceError(
                "invalid_argument", f"--http {http!r}: expected HOST:PORT or unix:PATH"
            )
        args += ["--http", http]
    if api_key_file:
        args += ["--api-key-file", _absolute(api_key_file, home, "the API key file")]
    return args


def build_target(
    platform: str | None = None,
    home: str | Path | None = None,
    socket: str | None = None,
    program: Sequence[str] | None = None,
    serve_args: Sequence[str] = (),
    http: str | None = None,
    api_key_file: str | None = None,
) -> Target:
    platform = platform or current_platform()
    home_path = Path(home).expanduser().absolute() if home else Path.home().absolute()
    serve_args = [*serve_args, *http_args(http, api_key_file, home_path)]
    if socket:
        sock = _absolute(socket, home_path, "the socket")
        if len(sock.encode()) > _MAX_SOCKET_PATH:
            raise ServiceError("invalid_argument", f"the socket path is too long: {sock}")
    elif platform == "macos":
        sock = str(home_path / "Library" / "Application Support" / "mlxd" / "mlxd.sock")
    else:
        sock = "%t/mlxd/mlxd.sock"  # $XDG_RUNTIME_DIR, as clients default to
    config_home = None
    if platform == "linux" and home is None and os.environ.get("XDG_CONFIG_HOME"):
        config_home = Path(os.environ["XDG_CONFIG_HOME"])
    exe = tuple(program) if program else default_program()
    exe = (_absolute(exe[0], home_path, "the mlxd executable"), *exe[1:])
    return Target(platform, home_path, os.getuid(), exe, sock, tuple(serve_args), config_home)


def example_target(platform: str) -> Target:
    """The target the files in launchd/ are rendered for: a user called ``you``."""
    home = Path("/Users/you" if platform == "macos" else "/home/you")
    return build_target(
        platform, home, socket=None, program=[str(home / "mlxd" / ".venv" / "bin" / "mlxd")]
    )


def write_examples(folder: str | Path) -> None:
    """Regenerate ``launchd/dev.mlxd.plist.example`` and ``launchd/systemd/*``."""
    folder = Path(folder)
    (folder / f"{LABEL}.plist.example").write_bytes(render_plist(example_target("macos")))
    linux = example_target("linux")
    (folder / "systemd").mkdir(exist_ok=True)
    for path, data in linux.files():
        (folder / "systemd" / path.name).write_bytes(data)


# ---------------------------------------------------------------------------- running it


class Runner:
    """Writes files and runs commands, or, in a dry run, prints what it would do."""

    def __init__(self, dry_run: bool, out: TextIO = sys.stdout) -> None:
        self.dry_run = dry_run
        self.out = out

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def mkdir(self, path: Path, private: bool = False) -> None:
        if path.is_dir():
            return
        mode = 0o700 if private else 0o755
        if self.dry_run:
            self.say(f"# would create the folder {path} (mode {mode:o})")
            return
        path.mkdir(mode=mode, parents=True, exist_ok=True)

    def write(self, path: Path, data: bytes) -> bool:
        """Write ``data`` if the file differs; returns whether it did (or would)."""
        try:
            old = path.read_bytes()
        except FileNotFoundError:
            old = None
        if old == data:
            self.say(f"# {path}: unchanged")
            return False
        if self.dry_run:
            state = "new" if old is None else "changed"
            self.say(f"# would write {path} ({state}):")
            self.out.write(data.decode())
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: a manager must never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.say(f"# wrote {path}")
        return True

    def remove(self, path: Path) -> None:
        if not path.exists():
            return
        if self.dry_run:
            self.say(f"# would remove {path}")
            return
        path.unlink()
        self.say(f"# removed {path}")

    def query(self, argv: list[str], note: str) -> bool | None:
        """Whether a read-only command succeeds; None in a dry run (unknown)."""
        if self.dry_run:
            self.say(f"$ {shlex.join(argv)}  # {note}")
            return None
        return self._call(argv, capture=True) == 0

    def run(self, argv: list[str], note: str = "", check: bool = True) -> int:
        suffix = f"  # {note}" if note else ""
        self.say(f"$ {shlex.join(argv)}{suffix}")
        if self.dry_run:
            return 0
        code = self._call(argv, capture=False)
        if check and code != 0:
            raise ServiceError("command_failed", f"{shlex.join(argv)} exited {code}")
        return code

    def _call(self, argv: list[str], capture: bool) -> int:
        try:
            out = subprocess.DEVNULL if capture else None
            return subprocess.run(argv, stdout=out, stderr=out).returncode
        except FileNotFoundError as exc:
            raise ServiceError(
                "command_failed", f"{argv[0]} not found (plan with --dry-run instead)"
            ) from exc


class _Launchd:
    def __init__(self, t: Target, r: Runner) -> None:
        self.t, self.r = t, r

    def _loaded(self) -> bool | None:
        return self.r.query(["launchctl", "print", self.t.service_target], "is it loaded?")

    def _bootstrap(self, note: str) -> None:
        self.r.run(["launchctl", "bootstrap", self.t.domain, str(self.t.plist_path)], note)

    def install(self, files_only: bool) -> None:
        data = render_plist(self.t)
        validate_plist(data, plist_dict(self.t))
        self.r.mkdir(self.t.log_dir)
        # launchd binds the socket but makes no folders; this one is the daemon's own.
        self.r.mkdir(Path(self.t.socket).parent, private=True)
        changed = self.r.write(self.t.plist_path, data)
        if files_only:
            return
        loaded = self._loaded()
        if changed and loaded is not False:
            note = "if it is loaded: unload the old plist" if loaded is None else "reload"
            self.r.run(["launchctl", "bootout", self.t.service_target], note, check=False)
        if changed or not loaded:
            self._bootstrap("if it is not loaded, or the plist changed")

    def uninstall(self) -> None:
        if self._loaded() is not False:
            self.r.run(["launchctl", "bootout", self.t.service_target], "if loaded", check=False)
        self.r.remove(self.t.plist_path)

    def start(self) -> None:
        self._require_installed()
        if not self._loaded():
            self._bootstrap("if it is not loaded")
        self.r.run(["launchctl", "kickstart", self.t.service_target])

    def stop(self) -> None:
        # bootout: SIGTERM, then the job and its socket are unloaded, so no connection
        # starts it again until `start` (a plain kill would be undone by the socket).
        if self._loaded() is not False:
            self.r.run(["launchctl", "bootout", self.t.service_target], "if loaded")

    def status(self) -> int:
        installed = self.t.plist_path.exists()
        self.r.say(f"# {self.t.plist_path}: {'installed' if installed else 'not installed'}")
        return self.r.run(["launchctl", "print", self.t.service_target], check=False)

    def logs(self, lines: int, follow: bool) -> int:
        files = [str(self.t.log_dir / "mlxd.log"), str(self.t.log_dir / "mlxd.out.log")]
        argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), *files]
        return self.r.run(argv, check=False)

    def _require_installed(self) -> None:
        if not self.r.dry_run and not self.t.plist_path.exists():
            raise ServiceError("not_installed", "run `mlxd service install` first")


class _Systemd:
    def __init__(self, t: Target, r: Runner) -> None:
        self.t, self.r = t, r

    def _ctl(self, *args: str, note: str = "", check: bool = True) -> int:
        return self.r.run(["systemctl", "--user", *args], note, check=check)

    def install(self, files_only: bool) -> None:
        existed = any(path.exists() for path, _ in self.t.files())
        changed = [self.r.write(path, data) for path, data in self.t.files()]
        if files_only:
            return
        if any(changed):
            self._ctl("daemon-reload")
        self._ctl("enable", "--now", f"{UNIT}.socket")
        if any(changed) and existed:
            self.r.say("# to apply the changes to a running daemon: mlxd service stop; start")

    def uninstall(self) -> None:
        self._ctl("disable", "--now", f"{UNIT}.socket", check=False)
        self._ctl("stop", f"{UNIT}.service", check=False)
        for path, _ in self.t.files():
            self.r.remove(path)
        self._ctl("daemon-reload", check=False)

    def start(self) -> None:
        if not self.r.dry_run and not (self.t.unit_dir / f"{UNIT}.socket").exists():
            raise ServiceError("not_installed", "run `mlxd service install` first")
        self._ctl("start", f"{UNIT}.socket", f"{UNIT}.service")

    def stop(self) -> None:
        # The socket too: else the next connection would start the service again.
        self._ctl("stop", f"{UNIT}.socket", f"{UNIT}.service")

    def status(self) -> int:
        return self._ctl("status", "--no-pager", f"{UNIT}.socket", f"{UNIT}.service", check=False)

    def logs(self, lines: int, follow: bool) -> int:
        argv = ["journalctl", "--user", "-u", f"{UNIT}.service", "-n", str(lines), "--no-pager"]
        return self.r.run([*argv, *(["-f"] if follow else [])], check=False)


def add_parser(commands: Any) -> None:
    """The ``service`` subcommand, on the ``mlxd`` parser's subparsers."""
    sub = commands.add_parser(
        "service",
        help="install and drive mlxd as a socket-activated service (launchd or systemd)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    sub.add_argument("action", choices=ACTIONS)
    sub.add_argument("--platform", choices=PLATFORMS, help="default: the one we run on")
    sub.add_argument(
        "--dry-run", action="store_true", help="print the files and commands; change nothing"
    )
    sub.add_argument("--home", help="the home folder to install into (default: $HOME)")
    sub.add_argument("--socket", help="the socket path (default: $MLXD_SOCKET, else per platform)")
    sub.add_argument("--executable", help="the mlxd program to run (default: this one's)")
    sub.add_argument(
        "--serve-args",
        default="",
        metavar="ARGS",
        help='extra `mlxd serve` arguments, one string: --serve-args="--keep-alive -1"',
    )
    sub.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="install: serve the HTTP APIs there too (127.0.0.1:8642, or unix:PATH)",
    )
    sub.add_argument(
        "--api-key-file", metavar="PATH", help="install: the HTTP API's key file (mode 0600)"
    )
    sub.add_argument(
        "--files-only", action="store_true", help="install: write the files, load nothing"
    )
    sub.add_argument("-n", "--lines", type=int, default=100, help="logs: lines to show")
    sub.add_argument("-f", "--follow", action="store_true", help="logs: keep printing")


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        target = build_target(
            args.platform,
            args.home,
            args.socket or os.environ.get("MLXD_SOCKET"),
            [args.executable] if args.executable else None,
            shlex.split(args.serve_args),
            args.http,
            args.api_key_file,
        )
        runner = Runner(args.dry_run, out)
        manager = (_Launchd if target.platform == "macos" else _Systemd)(target, runner)
        if args.action == "install":
            manager.install(args.files_only)
        elif args.action == "uninstall":
            manager.uninstall()
        elif args.action == "start":
            manager.start()
        elif args.action == "stop":
            manager.stop()
        elif args.action == "status":
            return manager.status()
        else:
            return manager.logs(args.lines, args.follow)
        return 0
    except ServiceError as exc:
        print(f"mlxd: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
