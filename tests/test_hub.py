"""Models by Hugging Face repo id, through ``huggingface_hub`` itself: ``mlxd pull`` from a
local stand-in for the Hub (``HF_ENDPOINT``), ``mlxd models``' cache listing, and a daemon
that serves the cached repo offline, token for token as mlx-lm loads the same files."""

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
from fakehub import FakeHub
from helpers import reference

REPO = "org/tiny"


@pytest.fixture
def base() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hf_env(base: Path, **extra: str) -> dict[str, str]:
    """The environment with a Hugging Face cache of the test's own (nothing of the real
    cache, token or endpoint), and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLXD_"))}
    empty = base / "empty.toml"  # no configuration file of the developer's
    empty.touch()
    env |= {"MLXD_CONFIG": str(empty), "MLXD_BLAS": "bundled", "MLXD_LOG_FORMAT": "json"}
    return {**env, "HF_HOME": str(base / "hf"), **extra}


def mlxd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_the_files_fetched_are_those_mlx_lm_fetches() -> None:
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    from mlxd.daemon.hub import ALLOW_PATTERNS

    assert ALLOW_PATTERNS == DEFAULT_ALLOW_PATTERNS


def test_pull_then_an_offline_daemon_serves_the_cached_repo(
    base: Path, tiny_model: Path, tiny_model_b: Path
) -> None:
    with FakeHub({REPO: tiny_model}) as hub:
        pulled = mlxd("pull", REPO, env=hf_env(base, HF_ENDPOINT=hub.url))
        assert pulled.returncode == 0, pulled.stderr
        downloads = [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]
        commit = hub.commit(REPO)
    assert f"GET /{REPO}/resolve/{commit}/model.safetensors" in downloads
    snapshot = base / "hf" / "hub" / "models--org--tiny" / "snapshots" / commit
    repo, state, path = pulled.stdout.strip().split("\t")
    assert (repo, path) == (REPO, str(snapshot)) and state.startswith("cached ")
    assert (snapshot / "config.json").is_file() and (snapshot / "model.safetensors").is_file()

    # The hub is gone: offline, the cache alone.
    offline = hf_env(base, HF_HUB_OFFLINE="1")
    listed = json.loads(mlxd("models", "--cached", "--json", env=offline).stdout)
    (cached,) = listed["cached"]
    assert cached["repo"] == REPO and cached["path"] == str(snapshot) and cached["bytes"] > 0
    assert "models" not in listed  # --cached asks no daemon

    d = start_daemon(short_tmpdir() / "mlxd.sock", "--model", f"coder={REPO}", env=offline)
    try:
        with d.client() as client:
            assert client.welcome.default_model == "coder"
            done = client.generate("def f():", model="coder", max_tokens=12)
            assert done.tokens == reference(snapshot, "def f():", 12)[1]
            (info,) = client.models()
            assert info.name == "coder" and info.path == str(snapshot)
        both = json.loads(mlxd("models", "--socket", str(d.socket), "--json", env=offline).stdout)
        assert [m["name"] for m in both["models"]] == ["coder"]
        assert [c["repo"] for c in both["cached"]] == [REPO]
        text = mlxd("models", "--socket", str(d.socket), env=offline).stdout.splitlines()
        assert text[0].startswith("coder\tresident ") and text[1].startswith(f"{REPO}\tcached ")

        # A new revision on the Hub: pulled, then SIGHUP, and the daemon serves it.
        with FakeHub({REPO: tiny_model_b}) as hub:
            assert mlxd("pull", REPO, env=hf_env(base, HF_ENDPOINT=hub.url)).returncode == 0
            newer = snapshot.parent / hub.commit(REPO)
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while '"reason": "reconfigured"' not in d.log():  # coder, resident, now stale
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        with d.client() as client:
            done = client.generate("def f():", model="coder", max_tokens=12)
            assert done.tokens == reference(newer, "def f():", 12)[1]
            assert [m.path for m in client.models()] == [str(newer)]
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(d.socket.parent, ignore_errors=True)


def test_serve_downloads_a_repo_the_cache_lacks_before_it_serves(
    base: Path, tiny_model: Path
) -> None:
    with FakeHub({REPO: tiny_model}) as hub:
        env = hf_env(base, HF_ENDPOINT=hub.url)
        d = start_daemon(short_tmpdir() / "mlxd.sock", "--model", f"coder={REPO}", env=env)
        try:
            fetched = [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]
            assert f"GET /{REPO}/resolve/{hub.commit(REPO)}/model.safetensors" in fetched
            assert '"event": "model_downloaded"' in d.log()
            asked = len(hub.requests)
            # Online, and the Hub up: the load, a reload and the listing ask it nothing.
            with d.client() as client:
                done = client.generate("x = ", max_tokens=8)
                assert done.tokens == reference(tiny_model, "x = ", 8)[1]
                d.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 30
                while '"event": "config_reloaded"' not in d.log():
                    assert time.monotonic() < deadline, d.log()
                    time.sleep(0.05)
                assert [m.name for m in client.models()] == ["coder"]
            assert hub.requests[asked:] == []
        finally:
            assert d.stop() == 0, d.log()
            shutil.rmtree(d.socket.parent, ignore_errors=True)


def test_a_repo_the_hub_lacks_is_one_line(base: Path, tiny_model: Path) -> None:
    with FakeHub({REPO: tiny_model}) as hub:
        env = hf_env(base, HF_ENDPOINT=hub.url)
        out = mlxd("pull", "org/nope", env=env)
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.startswith("mlxd: error: repo_not_found: org/nope: no such repository")
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        # serve refuses it as the configuration's fault, naming the setting.
        sock = base / "mlxd.sock"
        out = mlxd("serve", "--socket", str(sock), "--model", "c=org/nope", env=env)
        assert out.returncode == 78 and not sock.exists()
        # After the log lines of the start (the download was tried), one line, the last.
        errors = [x for x in out.stderr.splitlines() if not x.startswith("{")]
        assert errors == [out.stderr.strip().splitlines()[-1]], out.stderr
        assert errors[0].startswith("mlxd: error: invalid_config: --model c: org/nope: no such")
        assert errors[0].endswith("; nor is it a directory")
    offline = mlxd("pull", REPO, env=hf_env(base, HF_HUB_OFFLINE="1"))
    assert offline.returncode == 1 and "not_in_cache" in offline.stderr
    unreachable = mlxd("pull", REPO, env=hf_env(base, HF_ENDPOINT=hub.url))  # closed by now
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("mlxd: error: download_failed: org/tiny: ")
    assert len(unreachable.stderr.strip().splitlines()) == 1, unreachable.stderr


def test_a_repo_id_in_the_file_stays_a_repo_id(base: Path) -> None:
    config = base / "config.toml"
    config.write_text(f'[models]\ncoder = "{REPO}"\nlocal = "models/here"\n')
    (base / "models" / "here").mkdir(parents=True)
    out = mlxd("config", "show", "--json", "--config", str(config), env=hf_env(base))
    assert out.returncode == 0, out.stderr
    settings = json.loads(out.stdout)["settings"]
    assert settings["models.coder"]["value"] == REPO
    assert settings["models.local"]["value"] == str(base / "models" / "here")
