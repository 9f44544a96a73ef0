"""A broken configuration stops ``mlxd serve`` before it binds its socket: exit 78 and one
line naming the setting and what is wrong, never a daemon that fails every request."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import short_tmpdir


@pytest.fixture
def base() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(base: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXD_", "HF_"))}
    # No configuration file of the developer's, and a Hugging Face cache of the test's own.
    empty = base / "empty.toml"
    empty.touch()
    return {**env, "MLXD_CONFIG": str(empty), "HF_HOME": str(base / "hf"), **extra}


def refused(base: Path, *args: str, **env: str) -> str:
    """``mlxd serve ARGS``'s one line on stderr, having checked it refused to start."""
    sock = base / "mlxd.sock"
    out = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "serve", "--socket", str(sock), *args],
        capture_output=True, text=True, timeout=60, env=_env(base, **env),
    )  # fmt: skip
    assert out.returncode == 78, (out.returncode, out.stderr)
    assert out.stdout == "" and not sock.exists()
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("mlxd: error: invalid_config: "), lines
    return lines[0].removeprefix("mlxd: error: invalid_config: ")


def test_a_model_directory_that_is_not_there_or_not_a_model(base: Path) -> None:
    assert refused(base, "--model", "x=/nonexistent") == "--model x: /nonexistent does not exist"
    (base / "empty-dir").mkdir()
    said = refused(base, "--model", f"x={base / 'empty-dir'}")
    assert said.startswith(f"--model x: {base / 'empty-dir'} has no config.json")
    (base / "file").write_text("")
    said = refused(base, "--model", f"x={base / 'file'}")
    assert said == f"--model x: {base / 'file'} is not a directory"


def test_models_dir_that_does_not_exist(base: Path, tiny_model: Path) -> None:
    said = refused(base, "--model", f"tiny={tiny_model}", "--models-dir", "/nonexistent")
    assert said == "--models-dir: /nonexistent does not exist"
    said = refused(base, "--models-dir", str(tiny_model / "config.json"))
    assert said == f"--models-dir: {tiny_model / 'config.json'} is not a directory"


def test_a_default_model_that_names_no_model(base: Path, tiny_model: Path) -> None:
    said = refused(base, "--model", f"tiny={tiny_model}", "--default-model", "nope")
    assert said == "--default-model: no model 'nope': not in [models] (tiny)"
    (base / "models").mkdir()
    said = refused(base, "--models-dir", str(base / "models"), "--default-model", "nope")
    assert said.endswith(f"nor a model folder in {base / 'models'}")


def test_the_file_and_the_environment_are_named_as_the_settings_are(
    base: Path, tiny_model: Path
) -> None:
    config = base / "config.toml"
    config.write_text(f'[models]\ntiny = "{tiny_model}"\ngone = "gone-model"\n')
    said = refused(base, "--config", str(config))
    assert said == f"{config}:3: models.gone: {base / 'gone-model'} does not exist"
    said = refused(base, MLXD_MODELS="x=/nonexistent")
    assert said == "MLXD_MODELS x: /nonexistent does not exist"
    said = refused(base, "--model", f"tiny={tiny_model}", MLXD_MODELS_DIR="/nonexistent")
    assert said == "MLXD_MODELS_DIR: /nonexistent does not exist"


def test_an_uncached_repo_offline_is_refused_with_the_pull_to_run(
    base: Path, tiny_model: Path
) -> None:
    said = refused(base, "--model", "coder=org/not-pulled", HF_HUB_OFFLINE="1")
    assert said.startswith("--model coder: org/not-pulled is not in the Hugging Face cache (")
    assert str(base / "hf") in said
    assert said.endswith("run: mlxd pull org/not-pulled (HF_HUB_OFFLINE is set)")
