"""The ``mlxd`` command's contract: what scripts and other tools rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import Daemon, short_tmpdir
from helpers import RawConn, chat_tokens, reference


def mlxd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", *args],
        input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_generate_streams_only_the_text(daemon: Daemon, tiny_model: Path) -> None:
    out = mlxd("generate", "--socket", str(daemon.socket), "--max-tokens", "20", "def f():")
    assert out.returncode == 0, out.stderr
    assert out.stdout == reference(tiny_model, "def f():", 20)[0] + "\n"


def test_generate_reads_the_prompt_from_stdin(daemon: Daemon, tiny_model: Path) -> None:
    out = mlxd(
        "generate", "--socket", str(daemon.socket), "--max-tokens", "12", "-", stdin="def g():"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == reference(tiny_model, "def g():", 12)[0] + "\n"


def test_generate_json_prints_chunks_then_done(daemon: Daemon, tiny_model: Path) -> None:
    out = mlxd("generate", "--socket", str(daemon.socket), "--max-tokens", "8", "--json", "x = ")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert all(m["type"] == "chunk" for m in lines[:-1])
    done = lines[-1]
    assert done["type"] == "done"
    assert set(done["usage"]) == {"prompt_tokens", "cached_tokens", "completion_tokens"}
    assert {"ttft_s", "total_s", "tokens_per_s"} <= set(done["timings"])
    assert [t for m in lines[:-1] for t in m["tokens"]] == reference(tiny_model, "x = ", 8)[1]


def test_models_and_stats_print_one_json_object(daemon: Daemon) -> None:
    models = json.loads(mlxd("models", "--socket", str(daemon.socket), "--json").stdout)
    names = {m["name"] for m in models["models"]}
    assert {"tiny", "tiny-b"} <= names
    stats = json.loads(mlxd("stats", "--socket", str(daemon.socket), "--json").stdout)
    assert stats["worker_alive"] is True and stats["requests_total"] >= 0


def test_failures_exit_nonzero_with_one_line_on_stderr(daemon: Daemon) -> None:
    out = mlxd("generate", "--socket", str(daemon.socket), "--model", "nope", "hi")
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "unknown_model" in out.stderr
    missing = short_tmpdir() / "none.sock"
    out = mlxd("stats", "--socket", str(missing))
    assert out.returncode != 0 and "daemon_unavailable" in out.stderr


def test_demo_model_command_writes_a_loadable_model(tmp_path: Path) -> None:
    out = mlxd("demo-model", "--out", str(tmp_path / "m"), "--size", "tiny")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "config.json").is_file()
    assert reference(tmp_path / "m", "hi", 3)[1]


def test_chat_keeps_the_conversation(daemon: Daemon, tiny_model: Path) -> None:
    out = mlxd("chat", "--socket", str(daemon.socket), "--max-tokens", "6", stdin="hi\nmore\n\n")
    assert out.returncode == 0, out.stderr
    replies = out.stdout.split("\n")[:2]
    first = [{"role": "user", "content": "hi"}]
    assert replies[0] == reference_chat(tiny_model, first, 6)
    second = [
        *first,
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "more"},
    ]
    assert replies[1] == reference_chat(tiny_model, second, 6)


def reference_chat(model_dir: Path, messages: list[dict[str, str]], max_tokens: int) -> str:
    return reference(model_dir, chat_tokens(model_dir, messages), max_tokens)[0]


def test_request_log_lines_are_json_and_never_hold_the_prompt(daemon: Daemon) -> None:
    secret = "my-private-prompt-4242"
    assert (
        mlxd("generate", "--socket", str(daemon.socket), "--max-tokens", "3", secret).returncode
        == 0
    )
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    requests = [e for e in lines if e.get("event") == "request"]
    assert requests, daemon.log()
    last = requests[-1]
    assert {
        "model",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "ttft_s",
        "tokens_per_s",
    } <= set(last)
    assert last["model"] == "tiny" and last["completion_tokens"] == 3
    assert secret not in daemon.log()


def test_serve_with_no_model_builds_and_serves_the_demo_model(tmp_path: Path) -> None:
    from conftest import start_daemon

    sock = short_tmpdir() / "mlxd.sock"
    d = start_daemon(sock, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        with d.client() as client:
            assert client.welcome.default_model == "demo"
            done = client.generate("def main():", max_tokens=8)
            assert len(done.tokens) == 8
        assert (tmp_path / "cache" / "mlxd" / "demo-model" / "config.json").is_file()
        models = {
            m["name"]: m
            for m in json.loads(mlxd("models", "--socket", str(sock), "--json").stdout)["models"]
        }
        assert models["demo"]["resident"] is True
    finally:
        assert d.stop() == 0


def test_unload_and_clear_cache_of_an_unknown_model_are_errors(daemon: Daemon) -> None:
    sock = str(daemon.socket)
    for command in (["unload", "nope"], ["clear-cache", "--model", "nope"]):
        out = mlxd(*command, "--socket", sock)
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr == "mlxd: error: unknown_model: unknown model 'nope'\n"
    # On the wire too: the daemon answers unknown_model, not done.
    conn = RawConn(daemon.socket)
    conn.send({"type": "unload", "id": 1, "model": "nope"})
    conn.send({"type": "clear_cache", "id": 2, "model": "nope"})
    assert [conn.recv()["code"], conn.recv()["code"]] == ["unknown_model"] * 2
    conn.close()
    # A known model says what was done.
    out = mlxd("clear-cache", "--model", "tiny-b", "--socket", sock)
    assert (out.returncode, out.stdout) == (0, "cleared the prompt cache of tiny-b\n")
    assert mlxd("load", "tiny-b", "--socket", sock).returncode == 0
    out = mlxd("unload", "tiny-b", "--socket", sock)
    assert (out.returncode, out.stdout) == (0, "tiny-b\tunloaded\n"), out.stderr
    out = mlxd("unload", "tiny-b", "--socket", sock)
    assert (out.returncode, out.stdout) == (0, "tiny-b\twas not loaded\n"), out.stderr


def test_stats_prints_a_readable_summary(daemon: Daemon) -> None:
    sock = str(daemon.socket)
    assert mlxd("generate", "--socket", sock, "--max-tokens", "4", "stats me").returncode == 0
    out = mlxd("stats", "--socket", sock)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Stats(" not in text and "{" not in text  # no Python reprs
    assert "hit rate" in text and any(unit in text for unit in ("KiB", "MiB", "GiB"))
    lines = text.splitlines()
    # The per-model split: a header, then one row per model with its sizes.
    header = next(i for i, line in enumerate(lines) if line.startswith("per model"))
    columns = ["model", "weights", "live", "KV", "scratch", "cached", "KV"]
    assert lines[header].split()[2:] == columns
    row = next(line for line in lines[header + 1 :] if line.split()[0] == "tiny")
    assert "MiB" in row or "KiB" in row
    # No raw byte count of the budget: sizes are scaled.
    stats = json.loads(mlxd("stats", "--socket", sock, "--json").stdout)
    assert str(stats["memory"]["budget_bytes"]) not in text


def test_generate_speculative_gives_the_same_text_and_says_what_it_drafted(
    daemon: Daemon, tiny_model: Path
) -> None:
    prompt = "a b c a b c a b c a b"
    out = mlxd(
        "generate", "--socket", str(daemon.socket), "--max-tokens", "20",
        "--speculative", "prompt_lookup", "--verbose", prompt,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == reference(tiny_model, prompt, 20)[0] + "\n"
    assert "prompt_lookup: " in out.stderr and "drafted tokens accepted" in out.stderr
    bad = mlxd("generate", "--socket", str(daemon.socket), "--speculative", "maybe", "x")
    assert bad.returncode == 2 and "maybe" in bad.stderr
