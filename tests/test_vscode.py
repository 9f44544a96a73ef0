"""The VS Code extension's client and inline provider (clients/vscode), compiled with tsc and
run by node's own test runner against the real daemon; expected texts are mlx-lm's."""

from __future__ import annotations

import json
import os
import shutil
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


def test_vscode_client_and_provider_against_the_daemon(daemon: Daemon, tiny_model: Path) -> None:
    plain = {"prompt": "function add(a, b) {", "max_tokens": 24}
    plain["text"] = reference(tiny_model, plain["prompt"], plain["max_tokens"])[0]
    fim = {"prefix": "function add(a, b) {\n  return", "suffix": "\n}\n", "max_tokens": 24}
    tokens = fim_tokens(tiny_model, fim["prefix"], fim["suffix"])
    fim["text"] = reference(tiny_model, tokens, fim["max_tokens"])[0]

    build = subprocess.run(
        [str(TSC), "-p", str(VSCODE)], capture_output=True, text=True, timeout=120
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert NODE is not None
    run = subprocess.run(
        [NODE, "--test", str(VSCODE / "out" / "test")],
        env={
            **os.environ,
            "MLXD_SOCKET": str(daemon.socket),
            "MLXD_VSCODE_EXPECT": json.dumps({"plain": plain, "fim": fim}),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    passes = 6 if os.getuid() == 0 else 5  # one needs root (another user's socket)
    assert f"# pass {passes}" in run.stdout and "# fail 0" in run.stdout, run.stdout
