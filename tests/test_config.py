"""Configuration: the TOML file, MLXD_* and flags in that order of precedence, validation that
names the key and its line, SIGHUP reloads, and what the logs hold (never the prompt)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, short_tmpdir, wait_ready
from helpers import CLEAN_ENV, RawConn, mlxd, reference

from mlxd.client import Chunk, Done, InvalidRequestError


def serve(socket: Path, *args: str, env: dict[str, str] | None = None) -> Daemon:
    """``mlxd serve`` with only the flags given: the socket path comes from the config."""
    fd, name = tempfile.mkstemp(prefix="mlxd-daemon-", suffix=".log")
    os.close(fd)
    with open(name, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlxd.daemon", "serve", *args],
            stdout=log, stderr=subprocess.STDOUT, env={**CLEAN_ENV, **(env or {})},
        )  # fmt: skip
    daemon = Daemon(socket, proc, Path(name), list(args))
    wait_ready(daemon)
    return daemon


def events(daemon: Daemon, name: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == name]


def wait_event(daemon: Daemon, name: str, count: int = 1, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = events(daemon, name)
        if len(found) >= count:
            return found[count - 1]
        time.sleep(0.02)
    raise TimeoutError(f"no {name} event in the log:\n{daemon.log()}")


@pytest.fixture
def base() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- precedence


def test_config_show_names_each_values_source_file_then_env_then_flag(base: Path) -> None:
    config = base / "config.toml"
    config.write_text(
        'default_model = "coder"\n'
        "[models]\n"
        'coder = "models/coder"\n'
        "[limits]\n"
        "max_tokens = 100\n"
        "max_queued = 10\n"
        "max_batch_size = 4\n"
        "[cache]\n"
        'max_bytes = "1G"\n'
    )
    # It exists: else "models/coder", of the form org/name, would be a Hugging Face repo id.
    (base / "models" / "coder").mkdir(parents=True)
    out = mlxd(
        "config", "show", "--json", "--config", str(config), "--max-batch-size", "6",
        env={"MLXD_MAX_QUEUED": "20", "MLXD_MAX_BATCH_SIZE": "5", "MLXD_LOG_LEVEL": "WARNING"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    got = {k: (v["value"], v["source"]) for k, v in shown["settings"].items()}
    file = f"file:{config}"
    assert shown["file"] == str(config) and shown["file_from"] == "flag:--config"
    assert got["limits.max_tokens"] == (100, file)
    assert got["limits.max_queued"] == (20, "env:MLXD_MAX_QUEUED")
    assert got["limits.max_batch_size"] == (6, "flag:--max-batch-size")
    assert got["cache.max_bytes"] == (1024**3, file)
    assert got["log.level"] == ("warning", "env:MLXD_LOG_LEVEL")
    assert got["default_model"] == ("coder", file)
    # A relative directory in the file is relative to the file's folder.
    assert got["models.coder"] == (str(base / "models" / "coder"), file)
    assert got["limits.max_connections"][1] == "default"

    # The same as TOML, one line per value with its source beside it.
    text = mlxd("config", "show", env={"MLXD_CONFIG": str(config), "MLXD_MAX_QUEUED": "20"})
    assert text.returncode == 0, text.stderr
    assert f"limits.max_tokens = 100  # {file}" in text.stdout.splitlines()
    assert "limits.max_queued = 20  # env:MLXD_MAX_QUEUED" in text.stdout.splitlines()
    assert text.stdout.startswith(f"# file: {config} (found; env:MLXD_CONFIG)")


def test_a_daemon_uses_the_files_socket_and_limits_under_env_and_flags(
    base: Path, tiny_model: Path
) -> None:
    sock = base / "from-file.sock"
    config = base / "config.toml"
    config.write_text(
        f'socket = "{sock}"\n'
        f'state_dir = "{base / "state"}"\n'
        "[models]\n"
        f'tiny = "{tiny_model}"\n'
        "[limits]\n"
        "max_tokens = 10\n"
        "max_frame_bytes = 4096\n"
        "max_requests_per_connection = 1\n"
    )
    d = serve(
        sock, "--config", str(config), "--max-tokens-limit", "30",
        env={"MLXD_MAX_TOKENS": "20", "MLXD_MAX_FRAME_BYTES": "8K"},
    )  # fmt: skip
    try:
        with d.client() as client:  # connected on the file's socket path
            assert client.welcome.default_model == "tiny"
            assert client.welcome.max_frame_bytes == 8192  # env over the file
            # The flag's limit (30) over the env's (20) over the file's (10).
            assert client.generate("a", max_tokens=30).tokens == reference(tiny_model, "a", 30)[1]
            with pytest.raises(InvalidRequestError) as refused:
                client.generate("a", max_tokens=31)
            assert refused.value.field == "$.max_tokens" and "30" in refused.value.message
        # The file's own limit where nothing overrides it: one request in flight per connection.
        conn = RawConn(sock)
        conn.send({"type": "generate", "id": 1, "prompt": "a", "max_tokens": 30})
        conn.send({"type": "generate", "id": 2, "prompt": "b", "max_tokens": 1})
        _, second = conn.recv_until_end(2)
        assert second["type"] == "error" and second["code"] == "too_many_requests"
        conn.close()
        # Client commands find the daemon through the file's socket too.
        stats = mlxd("stats", "--json", env={"MLXD_CONFIG": str(config)})
        assert stats.returncode == 0 and json.loads(stats.stdout)["worker_alive"], stats.stderr
    finally:
        assert d.stop() == 0, d.log()


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("body", "line", "key", "says"),
    [
        ("[limits]\nmax_tokens = 10\nmax_tokns = 20\n", 3, "limits.max_tokns", "unknown key"),
        ('socket = "x.sock"\n\n[limits]\nmax_tokens = "lots"\n', 4, "limits.max_tokens", "int"),
        ("[log]\nlevel = 'loud'\n", 2, "log.level", "loud"),
        (
            "[model_options.a]\nkv_bits = 4\n\n[model_options.b]\nkv_bits = 7\n",
            5,
            "model_options.b.kv_bits",
            "expected one of 2, 3, 4, 5, 6, 8",
        ),
        ("[model_options.a]\nkv_bit = 4\n", 2, "model_options.a.kv_bit", "unknown key"),
        ("[cache]\nkv_bits = 1\n", 2, "cache.kv_bits", "expected one of"),
        ("[model_options.a]\nspeculative = 'draft'\n", 1, "model_options.a", "needs a draft"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "bad-choice",
        "model-option-choice",
        "model-option-unknown",
        "cache-kv-bits",
        "draft-without-draft",
    ],
)
def test_an_invalid_file_names_the_key_and_its_line_and_no_daemon_starts(
    base: Path, tiny_model: Path, body: str, line: int, key: str, says: str
) -> None:
    config = base / "config.toml"
    config.write_text(body)
    sock = base / "mlxd.sock"
    out = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "serve", "--config", str(config),
         "--socket", str(sock), "--model", f"tiny={tiny_model}"],
        capture_output=True, text=True, timeout=60, env=CLEAN_ENV,
    )  # fmt: skip
    assert out.returncode == 78  # EX_CONFIG: a service manager need not restart it
    assert out.stdout == ""
    message = out.stderr.strip()
    assert len(message.splitlines()) == 1, out.stderr
    assert message.startswith(f"mlxd: error: invalid_config: {config}:{line}: {key}: ")
    assert says in message
    assert not sock.exists()
    # `config show` refuses it the same way.
    shown = mlxd("config", "show", "--config", str(config))
    assert shown.returncode == 78 and f"{config}:{line}: {key}" in shown.stderr


def test_model_options_and_cache_kv_bits_are_shown_with_their_source(base: Path) -> None:
    config = base / "config.toml"
    config.write_text(
        '[models]\ncoder = "/m"\n\n[cache]\nkv_bits = 8\n\n'
        "[model_options.coder]\nkv_bits = 4\nkv_group_size = 32\n"
    )
    out = mlxd("config", "show", "--config", str(config), env={"MLXD_CACHE_KV_GROUP_SIZE": "128"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"cache.kv_bits = 8  # file:{config}" in lines
    assert "cache.kv_group_size = 128  # env:MLXD_CACHE_KV_GROUP_SIZE" in lines
    assert f"model_options.coder.kv_bits = 4  # file:{config}" in lines
    assert f"model_options.coder.kv_group_size = 32  # file:{config}" in lines
    shown = json.loads(mlxd("config", "show", "--json", "--config", str(config)).stdout)
    assert shown["settings"]["model_options.coder.kv_bits"]["value"] == 4


def test_invalid_env_and_flag_values_are_named_too(base: Path) -> None:
    out = mlxd("config", "show", env={"MLXD_MAX_QUEUED": "many"})
    assert out.returncode == 78 and "MLXD_MAX_QUEUED='many'" in out.stderr
    out = mlxd("config", "show", "--max-batch-size", "0")
    assert out.returncode == 78 and "--max-batch-size: Expected `int` >= 1" in out.stderr
    out = mlxd("config", "show", "--config", str(base / "missing.toml"))
    assert out.returncode == 78 and "no such configuration file" in out.stderr


# ---------------------------------------------------------------------- SIGHUP


def test_sighup_reloads_aliases_and_limits_without_dropping_a_stream(
    base: Path, tiny_model: Path, tiny_model_b: Path
) -> None:
    sock = base / "mlxd.sock"
    config = base / "config.toml"
    head = f'socket = "{sock}"\nstate_dir = "{base / "state"}"\n[models]\ntiny = "{tiny_model}"\n'
    config.write_text(head + f'swap = "{tiny_model}"\n[limits]\nmax_tokens = 500\n')
    d = serve(sock, "--config", str(config))
    try:
        with d.client() as client:
            before = client.generate("s", model="swap", max_tokens=4)  # swap is now resident
            assert before.tokens == reference(tiny_model, "s", 4)[1]
            stream = client.stream("def long():", max_tokens=400)
            chunks = [next(stream)]
            # While it streams: a new alias, one that points elsewhere, a lower limit, and
            # a socket that cannot change.
            config.write_text(
                head.replace("mlxd.sock", "other.sock")
                + f'tiny2 = "{tiny_model_b}"\nswap = "{tiny_model_b}"\n'
                + "[limits]\nmax_tokens = 40\n"
            )
            d.proc.send_signal(signal.SIGHUP)
            reloaded = wait_event(d, "config_reloaded")
            changed = set(reloaded["changed"])  # type: ignore[call-overload]
            assert changed == {"models.tiny2", "models.swap", "limits.max_tokens"}
            assert wait_event(d, "config_needs_restart")["keys"] == ["socket"]
            chunks += list(stream)
            done = chunks.pop()
            assert isinstance(done, Done) and done.finish_reason == "length"
            tokens = [t for c in chunks if isinstance(c, Chunk) for t in c.tokens]
            assert tokens == reference(tiny_model, "def long():", 400)[1]  # unchanged
            # The reload came while the stream was running: before its request line.
            lines = [json.loads(x) for x in d.log().splitlines() if x.startswith("{")]
            reload_at = next(i for i, e in enumerate(lines) if e["event"] == "config_reloaded")
            ended_at = next(i for i, e in enumerate(lines) if e.get("completion_tokens") == 400)
            assert reload_at < ended_at

            # The same connection now has the new alias and the new limit.
            again = client.generate("x = ", model="tiny2", max_tokens=40)
            assert again.tokens == reference(tiny_model_b, "x = ", 40)[1]
            swapped = client.generate("s", model="swap", max_tokens=4)
            assert swapped.tokens == reference(tiny_model_b, "s", 4)[1]
            unloaded = wait_event(d, "model_unloaded")
            assert unloaded["model"] == "swap" and unloaded["reason"] == "reconfigured"
            with pytest.raises(InvalidRequestError) as refused:
                client.generate("x = ", max_tokens=41)
            assert refused.value.field == "$.max_tokens"
            assert sock.exists() and not (base / "other.sock").exists()

            # An invalid file: logged, and the old configuration stays.
            config.write_text(head + "[limits]\nmax_tokens = -5\n")
            d.proc.send_signal(signal.SIGHUP)
            failed = wait_event(d, "config_reload_failed")
            assert f"{config}:6: limits.max_tokens" in str(failed["error"])
            assert client.generate("y", model="tiny2", max_tokens=3).done.finish_reason == "length"
            with pytest.raises(InvalidRequestError):
                client.generate("y", max_tokens=41)
        with d.client() as fresh:  # and it still takes new connections
            fresh.ping()
            assert fresh.generate("z", max_tokens=2).done.usage.completion_tokens == 2
        assert len(events(d, "config_reloaded")) == 1
    finally:
        assert d.stop() == 0, d.log()


# ---------------------------------------------------------------------- logs


def test_one_json_request_line_per_request_and_no_prompt_text(daemon: Daemon) -> None:
    secret = "my-secret-prompt-31337"
    conn = RawConn(daemon.socket)
    conn.send({"type": "generate", "id": 424242, "prompt": secret, "max_tokens": 4})
    _, end = conn.recv_until_end(424242)
    conn.close()
    assert end["type"] == "done"
    deadline = time.monotonic() + 10
    while not [e for e in events(daemon, "request") if e.get("id") == 424242]:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)
    (line,) = [e for e in events(daemon, "request") if e.get("id") == 424242]
    assert line["model"] == "tiny" and line["finish_reason"] == "length"
    assert line["completion_tokens"] == 4 and line["prompt_tokens"] == end["usage"]["prompt_tokens"]
    assert line["cached_tokens"] == end["usage"]["cached_tokens"]
    for timing in ("queue_s", "ttft_s", "total_s"):
        assert isinstance(line[timing], float)
    assert line["level"] == "info" and "timestamp" in line
    assert secret not in daemon.log()
    assert "prompt" not in line


def test_debug_logging_may_show_the_prompt_and_logs_model_loads(
    base: Path, tiny_model: Path
) -> None:
    from conftest import start_daemon

    d = start_daemon(base / "mlxd.sock", "--model", f"tiny={tiny_model}", "--log-level", "debug")
    try:
        with d.client() as client:
            client.generate("debug-visible-prompt", max_tokens=2)
            client.unload("tiny")
    finally:
        assert d.stop() == 0, d.log()
    (line,) = events(d, "request")
    assert line["prompt"] == "debug-visible-prompt"
    loaded = events(d, "model_loaded")[0]
    assert loaded["model"] == "tiny" and loaded["bytes"] > 0  # type: ignore[operator]
    assert events(d, "model_unloaded")[0]["reason"] == "request"
