"""The VS Code extension's client and inline provider (clients/vscode), compiled with tsc and
run by node's own test runner against the real daemon; expected texts are mlx-lm's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Daemon
from helpers import fim_tokens, reference

VSCODE = Path(__file__).resolve().parent.parent / "clients" / "vscode"
NODE = shutil.which("node")
TSC = VSCODE / "node_modules" / ".bin" / "tsc"

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (.ci/run installs nodejs)"),
    pytest.mark.skipif(
        not TSC.exists(), reason="clients/vscode/node_modules is missing: run `npm ci` there"
    ),
]


@pytest.fixture(scope="module")
def compiled() -> Path:
    build = subprocess.run(
        [str(TSC), "-p", str(VSCODE)], capture_output=True, text=True, timeout=120
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return VSCODE / "out" / "test"


def node_test(tests: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``node --test``; a run that hangs fails the test, and its processes are ended (the
    runner starts a child per test file: the whole process group goes)."""
    assert NODE is not None
    proc = subprocess.Popen(
        [NODE, "--test", str(tests)],
        env={k: v for k, v in os.environ.items() if not k.startswith("MLXD_VSCODE")} | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"node --test hung (killed after 120 s):\n{out}{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def expected(tiny_model: Path) -> dict[str, dict[str, object]]:
    plain: dict[str, object] = {"prompt": "function add(a, b) {", "max_tokens": 24}
    plain["text"] = reference(tiny_model, "function add(a, b) {", 24)[0]
    prefix, suffix = "function add(a, b) {\n  return", "\n}\n"
    fim: dict[str, object] = {"prefix": prefix, "suffix": suffix, "max_tokens": 24}
    fim["text"] = reference(tiny_model, fim_tokens(tiny_model, prefix, suffix), 24)[0]
    return {"plain": plain, "fim": fim}


def test_vscode_client_and_provider_against_the_daemon(
    daemon: Daemon, tiny_model: Path, compiled: Path
) -> None:
    run = node_test(
        compiled,
        {
            "MLXD_SOCKET": str(daemon.socket),
            "MLXD_VSCODE_EXPECT": json.dumps(expected(tiny_model)),
        },
    )
    assert run.returncode == 0, run.stdout + run.stderr
    passes = 6 if os.getuid() == 0 else 5  # one needs root (another user's socket)
    assert f"# pass {passes}" in run.stdout and "# fail 0" in run.stdout, run.stdout


def test_without_the_expected_outputs_the_node_tests_fail_at_once_saying_how_to_run_them(
    daemon: Daemon, compiled: Path
) -> None:
    # As clients/vscode/README.md once suggested: MLXD_SOCKET=... node --test out/test/. It
    # hung (clients left open by the failing tests); now it fails before any test runs.
    run = node_test(compiled, {"MLXD_SOCKET": str(daemon.socket)})
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "MLXD_VSCODE_EXPECT is not set" in out and "tests/test_vscode.py" in out, out
    assert "# pass 0" in run.stdout, run.stdout


def test_a_failing_node_test_ends_the_run_instead_of_hanging_it(
    daemon: Daemon, tiny_model: Path, compiled: Path
) -> None:
    wrong = expected(tiny_model)
    wrong["plain"]["text"] = wrong["fim"]["text"] = "not what the model says"
    run = node_test(
        compiled,
        {"MLXD_SOCKET": str(daemon.socket), "MLXD_VSCODE_EXPECT": json.dumps(wrong)},
    )
    assert run.returncode != 0
    assert "# fail 2" in run.stdout, run.stdout  # the two that compare texts; no hang
