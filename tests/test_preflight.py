"""A broken configuration stops ``mlxd serve`` before it binds its socket: exit 78 and one
line naming the setting and what is wrong, never a daemon that fails every request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import short_tmpdir, start_daemon


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


def test_a_reload_to_a_broken_model_is_refused_and_the_old_configuration_kept(
    base: Path, tiny_model: Path
) -> None:
    config = base / "config.toml"
    config.write_text(f'[models]\ntiny = "{tiny_model}"\n')
    d = start_daemon(base / "mlxd.sock", "--config", str(config), env=_env(base))
    try:
        config.write_text(f'[models]\ntiny = "{tiny_model}"\nother = "/nonexistent"\n')
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "config_reload_failed" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        (line,) = [json.loads(x) for x in d.log().splitlines() if "config_reload_failed" in x]
        assert line["error"] == f"{config}:3: models.other: /nonexistent does not exist"
        with d.client() as client:
            assert [m.name for m in client.models()] == ["tiny"]
            assert client.generate("hi", max_tokens=2).done.usage.completion_tokens == 2
    finally:
        assert d.stop() == 0, d.log()
