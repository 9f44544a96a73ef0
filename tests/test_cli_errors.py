"""The ``mlxd`` command's mistakes: each ends in one line on stderr that says what is wrong,
never a traceback; usage errors exit 2 (as argparse does), configuration errors 78."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import short_tmpdir
from helpers import mlxd

from mlxd.protocol.paths import SUN_PATH_BYTES


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_demo_model_into_a_folder_of_other_files_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    out = mlxd("demo-model", "--out", str(tmp_path), "--size", "tiny")
    assert out.returncode == 1
    line = one_line(out)
    assert line.startswith("mlxd: error: cannot_write: --out: ")
    assert str(tmp_path) in line and "not empty" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_socket_path_too_long_for_the_platform_is_refused_in_one_line() -> None:
    base = short_tmpdir()
    try:
        folder = base / ("d" * (SUN_PATH_BYTES + 10 - len(str(base))))
        sock = folder / "mlxd.sock"
        length = len(os.fsencode(sock))
        # The daemon refuses it before it creates anything: no folder, no lock.
        out = mlxd("serve", "--socket", str(sock), "--state-dir", str(base / "state"))
        assert out.returncode == 78
        line = one_line(out)
        assert line.startswith(f"mlxd: error: invalid_config: the socket path {sock} is ")
        assert f"{length} bytes" in line and f"at most {SUN_PATH_BYTES - 1}" in line
        assert not folder.exists()
        # From the environment too, and for the HTTP API's socket.
        out = mlxd("serve", "--state-dir", str(base / "state"), env={"MLXD_SOCKET": str(sock)})
        assert out.returncode == 78 and f"{length} bytes" in one_line(out)
        out = mlxd(
            "serve", "--socket", str(base / "s"), "--http", f"unix:{sock}",
            "--state-dir", str(base / "state"),
        )  # fmt: skip
        assert out.returncode == 78 and "--http unix:PATH" in one_line(out)
        # A client says the same of it, not "no such file".
        for command in (["stats"], ["stop"], ["generate", "hi"]):
            out = mlxd(*command, "--socket", str(sock))
            assert out.returncode == 78, out.stderr
            assert f"the socket path {sock} is {length} bytes" in one_line(out)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("value", ["5X", "-5G", "lots"])
def test_a_size_flag_says_not_a_size_as_the_file_and_environment_do(value: str) -> None:
    out = mlxd("config", "show", "--memory-budget", value)
    assert out.returncode == 2
    line = one_line(out)
    assert line.startswith("mlxd config show: error: argument --memory-budget: ")
    assert f"{value!r} is not a size" in line
    out = mlxd("config", "show", env={"MLXD_MEMORY_BUDGET": value})
    assert out.returncode == 78
    assert f"MLXD_MEMORY_BUDGET={value!r}: {value!r} is not a size" in one_line(out)


def test_a_bad_log_level_lists_the_valid_ones() -> None:
    levels = ("debug", "info", "warning", "error", "critical")
    out = mlxd("serve", "--log-level", "verbose")
    assert out.returncode == 2
    line = one_line(out)
    assert line.startswith("mlxd serve: error: argument --log-level: ")
    assert all(level in line for level in levels), line
    assert mlxd("config", "show", "--log-level", "WARNING").returncode == 0  # any case
    out = mlxd("config", "show", env={"MLXD_LOG_LEVEL": "verbose"})
    assert out.returncode == 78
    assert all(level in one_line(out) for level in levels), out.stderr


def test_a_mistyped_flag_is_refused_by_its_own_command() -> None:
    out = mlxd("generate", "--max-tokn", "3", "hi")
    assert out.returncode == 2
    line = one_line(out)
    assert line.startswith("mlxd generate: error: unrecognized arguments: --max-tokn")
    assert "did you mean --max-tokens?" in line and "mlxd generate --help" in line
    out = mlxd("config", "show", "--memory-budgit", "8G")
    assert out.returncode == 2
    assert one_line(out).startswith("mlxd config show: error: unrecognized arguments")


def test_version() -> None:
    out = mlxd("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"mlxd {version('mlxd')}\n"
