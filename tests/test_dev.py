"""``./dev``: the demo shows the completion alone on a terminal (the daemon's log goes to a
file it names), shows pip's progress, and installs the dev extras only for ``./dev test``.

Run on a copy of the script in a folder of its own, whose ``.venv`` stands in for a real
one: its python is this test's interpreter, except that ``-m pip`` only records what it was
asked (and prints a line, as pip would), so nothing is installed anywhere.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import short_tmpdir
from helpers import reference
from terminal import Terminal

REPO = Path(__file__).resolve().parent.parent


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def root() -> Iterator[Path]:
    """A folder holding ``dev``, ``pyproject.toml`` and a stand-in ``.venv``."""
    base = short_tmpdir()
    shutil.copy(REPO / "dev", base / "dev")
    shutil.copy(REPO / "pyproject.toml", base / "pyproject.toml")
    bin_dir = base / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    executable(
        bin_dir / "python",
        "#!/bin/sh\n"
        'if [ "$1 $2" = "-m pip" ]; then\n'
        f'    shift 2; echo "$*" >>"{base}/pip-calls"; echo "Collecting stand-in ($*)"; exit 0\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n',
    )
    executable(bin_dir / "mlxd", f'#!/bin/sh\nexec "{sys.executable}" -m mlxd.daemon "$@"\n')
    yield base
    shutil.rmtree(base, ignore_errors=True)


def run_dev(root: Path, *args: str, env: dict[str, str]) -> tuple[int, str]:
    """``./dev ARGS`` on a terminal (a pty): (exit status, what the terminal showed)."""
    term = Terminal(["/bin/bash", str(root / "dev"), *args], {**os.environ, **env}, cwd=root)
    try:
        return term.exit_code(timeout=240), term.output
    finally:
        term.kill()


def pip_calls(root: Path) -> list[str]:
    calls = root / "pip-calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_the_demo_shows_the_completion_alone_and_says_where_the_log_is(
    root: Path, tiny_model: Path
) -> None:
    prompt = "def fibonacci(n):"
    config = root / "empty.toml"
    config.write_text("")
    code, shown = run_dev(
        root, "demo", prompt,
        env={
            "MLXD_SOCKET": str(root / "mlxd.sock"),
            "MLXD_CONFIG": str(config),
            "MLXD_STATE_DIR": str(root / "state"),
            "MLXD_MODELS": f"tiny={tiny_model}",  # not the demo model: nothing to build
        },
    )  # fmt: skip
    assert code == 0, shown
    # What the demo needs, no dev extras; pip's lines were shown while it ran.
    assert pip_calls(root) == ["install --upgrade pip", "install -e ."]
    assert "Collecting stand-in (install -e .)" in shown
    # The completion, whole, with nothing of the daemon's log inside it.
    completion = reference(tiny_model, prompt, 64)[0]
    assert completion.replace("\n", "\r\n") in shown, shown
    log = root / ".venv" / "demo-daemon.log"
    assert "config_loaded" in log.read_text()
    assert "config_loaded" not in shown and "[info" not in shown, shown
    assert f"the daemon's log: {log.relative_to(root)}" in shown
    assert "tokens/s" in shown  # generate --verbose's summary


def test_the_demo_installs_no_dev_extras_and_the_tests_do_each_once(root: Path) -> None:
    # A stand-in mlxd that says a daemon runs: the demo's own work is the other test's.
    executable(root / ".venv" / "bin" / "mlxd", "#!/bin/sh\nexit 0\n")
    env = {"MLXD_SOCKET": str(root / "mlxd.sock"), "MLXD_BLAS": "bundled"}
    plain = ["install --upgrade pip", "install -e ."]
    dev = ["install --upgrade pip", "install -e .[dev]"]

    def installs(*args: str) -> list[str]:
        before = len(pip_calls(root))
        code, shown = run_dev(root, *args, env=env)
        assert code == 0, shown
        return pip_calls(root)[before:]

    assert installs("demo") == plain
    # `./dev test ARGS` runs pytest with ARGS: --version is enough to see the install.
    assert installs("test", "--version") == dev
    assert installs("test", "--version") == []
    assert installs("demo") == []  # the dev install has what the demo needs
    # The project's metadata changed since: each installs again, once.
    now = time.time()
    os.utime(root / "pyproject.toml", (now - 3600, now - 3600))
    for stamp in (root / ".venv").glob(".mlxd-installed*"):
        os.utime(stamp, (now - 7200, now - 7200))
    assert installs("demo") == plain
    assert installs("test", "--version") == dev
    assert installs("demo") == installs("test", "--version") == []
