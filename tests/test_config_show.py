"""``mlxd config show`` prints a configuration file: saved and given back to ``--config``, it
is the same configuration, whatever the values and wherever they came from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit
from helpers import CLEAN_ENV

from mlxd.daemon import settings
from mlxd.daemon.cli import build_parser

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def shown_then_loaded(
    tmp_path: Path, flags: list[str], env: dict[str, str]
) -> tuple[settings.Loaded, settings.Loaded, str]:
    """(the configuration from ``flags`` and ``env``, the one ``config show``'s output gives
    loaded as a file, that output)."""
    env = {**CLEAN_ENV, **env}
    out = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "config", "show", *flags],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    saved = tmp_path / "shown.toml"
    saved.write_text(out.stdout)
    args = build_parser().parse_args(["serve", *flags])
    original = settings.load(vars(args), env, args.config)
    # serve --config saved, nothing else: the file alone must say it all.
    again = settings.load({}, CLEAN_ENV, str(saved))
    return original, again, out.stdout


@pytest.fixture(autouse=True)
def _no_socket_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Config's default socket reads the process's environment: keep it the same for both.
    monkeypatch.delenv("MLXD_SOCKET", raising=False)


def test_the_default_configuration_round_trips(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    original, again, text = shown_then_loaded(tmp_path, ["--config", str(empty)], {})
    assert again.config == original.config
    # The built-in demo model (no model given) stays the default, not a configured model.
    assert again.config.demo_model_dir == original.config.demo_model_dir is not None
    assert "# models.demo = " in text


def test_a_configuration_with_models_lists_and_odd_strings_round_trips(
    tmp_path: Path, tiny_model: Path, tiny_model_b: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'default_model = "tiny"\n'
        'pinned_models = ["tiny", "a \\"quoted\\" name"]\n'
        "keep_alive = -1\n"
        'http = "127.0.0.1:11434"\n'
        "[models]\n"
        f'tiny = "{tiny_model}"\n'
        f'"odd.name \\\\ é" = "{tiny_model_b}"\n'
        "[cache]\n"
        'max_bytes = "1G"\n'
        "persist = false\n"
        "[limits]\n"
        "max_prompt_tokens = 2048\n"
        "handshake_timeout = 2.5\n"
        "[log]\n"
        'level = "WARNING"\n'
    )
    flags = [
        "--config", str(config), "--model", f"tiny-b={tiny_model_b}",
        "--state-dir", str(tmp_path / "state dir"), "--memory-headroom", "0.25",
        "--allow-root",
    ]  # fmt: skip
    original, again, _ = shown_then_loaded(tmp_path, flags, {"MLXD_MAX_QUEUED": "20"})
    assert again.config == original.config
    c = again.config
    assert c.pinned_models == ["tiny", 'a "quoted" name']
    assert c.models == {
        "tiny": str(tiny_model), "odd.name \\ é": str(tiny_model_b), "tiny-b": str(tiny_model_b),
    }  # fmt: skip
    assert (c.max_queued, c.cache_max_bytes, c.cache_persist) == (20, 1024**3, False)
    assert (c.keep_alive_s, c.log_level, c.allow_root) == (-1, "warning", True)


def test_a_relative_path_is_written_as_the_path_it_means(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "config", "show", "--config", str(empty),
         "--state-dir", "here/state"],
        capture_output=True, text=True, timeout=60, env=CLEAN_ENV, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    saved = tmp_path / "elsewhere" / "shown.toml"
    saved.parent.mkdir()
    saved.write_text(out.stdout)
    again = settings.load({}, CLEAN_ENV, str(saved))
    assert again.config.state_dir == str(tmp_path / "here" / "state")


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        'quote " and backslash \\ and \t tab, \n newline, \x7f delete, \x00 nul, \x1b escape',
        "unicode é ✓ 𝄞",
        0,
        -3,
        2**40,
        0.1,
        1e-05,
        -1.0,
        1e300,
        float("inf"),
        True,
        False,
        ["a", 'b"', ""],
        [],
    ],
)
def test_each_value_reads_back_through_tomllib_as_it_was(value: object) -> None:
    key = 'a "key".with dots'
    parsed = tomllib.loads(f"{tomlkit.key(key).as_string()} = {tomlkit.item(value).as_string()}\n")
    assert parsed == {key: value}
    assert type(parsed[key]) is type(value)
