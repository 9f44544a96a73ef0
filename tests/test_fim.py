"""Fill in the middle (``generate`` with ``suffix``) through a real daemon: the model's FIM
tokens frame prefix and suffix, and a model without them falls back to the prefix alone."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import RawConn, fim_tokens, reference

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n    return total\n"


def test_fim_uses_the_models_fim_tokens(daemon: Daemon, tiny_model: Path) -> None:
    tokens = fim_tokens(tiny_model, PREFIX, SUFFIX)
    text, ids = reference(tiny_model, tokens, 32)
    with daemon.client() as client:
        done = client.generate(PREFIX, suffix=SUFFIX, max_tokens=32)
        plain = client.generate(PREFIX, max_tokens=32)
    assert done.tokens == ids and done.text == text
    assert done.done.fim == "tokens"
    assert done.done.usage is not None and done.done.usage.prompt_tokens == len(tokens)
    # Without a suffix nothing changes: a plain completion, no fim in done.
    assert plain.done.fim is None
    assert plain.tokens == reference(tiny_model, PREFIX, 32)[1]


def test_fim_with_an_empty_suffix_still_uses_fim_tokens(daemon: Daemon, tiny_model: Path) -> None:
    tokens = fim_tokens(tiny_model, PREFIX, "")
    with daemon.client() as client:
        done = client.generate(PREFIX, suffix="", max_tokens=16)
    assert done.tokens == reference(tiny_model, tokens, 16)[1]
    assert done.done.fim == "tokens"


def test_suffix_without_prompt_is_refused(daemon: Daemon) -> None:
    conn = RawConn(daemon.socket)
    try:
        conn.send(
            {
                "type": "generate",
                "id": 1,
                "messages": [{"role": "user", "content": "hi"}],
                "suffix": "x",
            }
        )
        _, end = conn.recv_until_end(1)
        assert end["type"] == "error"
        assert end["code"] == "invalid_request" and end["field"] == "$.suffix"
        conn.send({"type": "ping", "id": 2})  # the connection goes on
        assert conn.recv_until_end(2)[1]["type"] == "done"
    finally:
        conn.close()


@pytest.fixture(scope="module")
def no_fim_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its FIM tokens renamed: a tokenizer that has none."""
    out = tmp_path_factory.mktemp("no-fim") / "model"
    shutil.copytree(tiny_model, out)
    path = out / "tokenizer.json"
    spec = json.loads(path.read_text())
    renames = {f"<|fim_{p}|>": f"<|unused_{p}|>" for p in ("prefix", "suffix", "middle")}
    for token in spec["added_tokens"]:
        token["content"] = renames.get(token["content"], token["content"])
    vocab = spec["model"]["vocab"]
    for old, new in renames.items():
        vocab[new] = vocab.pop(old)
    path.write_text(json.dumps(spec))
    return out


@pytest.fixture(scope="module")
def no_fim_daemon(no_fim_model: Path) -> Iterator[Daemon]:
    d = start_daemon(short_tmpdir() / "mlxd.sock", "--model", f"plain={no_fim_model}")
    yield d
    d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)


def test_fim_falls_back_to_the_prefix_without_fim_tokens(
    no_fim_daemon: Daemon, no_fim_model: Path
) -> None:
    text, ids = reference(no_fim_model, PREFIX, 24)
    with no_fim_daemon.client() as client:
        done = client.generate(PREFIX, suffix=SUFFIX, max_tokens=24)
    assert done.tokens == ids and done.text == text
    assert done.done.fim == "prefix_only"
