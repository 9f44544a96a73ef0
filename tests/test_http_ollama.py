"""The Ollama API, through the official ``ollama`` SDK against a real daemon: greedy text
equals mlx-lm in-process, keep-alive loads and unloads, errors have Ollama's shape."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import ollama
import pytest
from conftest import HttpDaemon, short_tmpdir, start_http_daemon
from helpers import chat_tokens, reference

from mlxd.daemon.ollama_api import parse_keep_alive
from mlxd.daemon.ollama_models import BadRequest

GREEDY = {"temperature": 0, "num_predict": 24}


def sdk(d: HttpDaemon) -> ollama.Client:
    return ollama.Client(host=d.base_url, timeout=120)


def http(d: HttpDaemon, method: str, path: str, body: object = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(d.base_url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_list_show_and_ps(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    client = sdk(http_daemon)
    with http_daemon.client() as native:
        names = sorted(m.name for m in native.models())
    listed = client.list().models
    assert sorted(m.model for m in listed) == names
    tiny = next(m for m in listed if m.model == "tiny")
    on_disk = sum(p.stat().st_size for p in tiny_model.rglob("*") if p.is_file())
    assert tiny.size == on_disk and tiny.digest and tiny.modified_at is not None
    assert tiny.details is not None and tiny.details.format == "safetensors"

    shown = client.show("tiny")
    assert shown.details is not None and shown.details.family == "llama"
    assert "<|assistant|>" in (shown.template or "")
    assert shown.capabilities == ["completion", "insert"]  # the demo models have FIM tokens
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    # The legacy "name" field, and a tag on the name.
    status, body = http(http_daemon, "POST", "/api/show", {"name": "tiny:latest"})
    assert status == 200 and body["details"]["family"] == "llama"

    client.generate(model="tiny", prompt="Hello", options={"num_predict": 1})
    running = {m.model: m for m in client.ps().models}
    assert "tiny" in running
    assert running["tiny"].size and running["tiny"].expires_at is not None


def test_generate_applies_the_chat_template_unless_raw(
    http_daemon: HttpDaemon, tiny_model: Path
) -> None:
    client = sdk(http_daemon)
    prompt = "Tell me about sockets."
    templated, ids = reference(
        tiny_model, chat_tokens(tiny_model, [{"role": "user", "content": prompt}]), 24
    )
    raw_text, raw_ids = reference(tiny_model, prompt, 24)

    one = client.generate(model="tiny", prompt=prompt, options=GREEDY)
    assert one.response == templated and one.done and one.done_reason == "length"
    assert one.eval_count == len(ids) == 24
    assert one.prompt_eval_count == len(
        chat_tokens(tiny_model, [{"role": "user", "content": prompt}])
    )
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(one, field), int), field
    assert one.total_duration and one.total_duration >= (one.eval_duration or 0)

    parts = list(client.generate(model="tiny", prompt=prompt, options=GREEDY, stream=True))
    assert "".join(p.response or "" for p in parts) == templated
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].eval_count == 24 and parts[-1].response == ""

    raw = client.generate(model="tiny", prompt=prompt, raw=True, options=GREEDY)
    assert raw.response == raw_text and raw.eval_count == len(raw_ids)

    system = "You are terse."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    with_system = client.generate(model="tiny", prompt=prompt, system=system, options=GREEDY)
    assert with_system.response == reference(tiny_model, chat_tokens(tiny_model, messages), 24)[0]


def test_generate_suffix_is_fill_in_the_middle(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    from helpers import fim_tokens

    client = sdk(http_daemon)
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    want, _ = reference(tiny_model, fim_tokens(tiny_model, prefix, suffix), 16)
    got = client.generate(
        model="tiny", prompt=prefix, suffix=suffix, options={**GREEDY, "num_predict": 16}
    )
    assert got.response == want


def test_chat_streamed_and_not_equal_mlx_lm(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    client = sdk(http_daemon)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a Unix socket?"},
    ]
    want, ids = reference(tiny_model, chat_tokens(tiny_model, messages), 24)
    # Unknown options are ignored, as Ollama ignores them.
    options = {**GREEDY, "num_ctx": 4096, "mirostat": 0, "no_such_option": True}
    one = client.chat(model="tiny", messages=messages, options=options)
    assert one.message.role == "assistant" and one.message.content == want
    assert one.done and one.eval_count == len(ids) and one.created_at and one.model == "tiny"
    parts = list(client.chat(model="tiny", messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content or "" for p in parts) == want
    assert parts[-1].done and parts[-1].done_reason == "length" and parts[-1].eval_count == 24


def test_keep_alive_loads_and_unloads(tiny_model: Path) -> None:
    # A copy of the tiny model without a chat template: generate gives it the plain prompt.
    plain = short_tmpdir() / "plain"
    shutil.copytree(tiny_model, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    d = start_http_daemon(
        "--model", f"tiny={tiny_model}", "--model", f"plain={plain}", "--default-model", "tiny",
        "--max-tokens-limit", "40",
    )  # fmt: skip
    try:
        client = sdk(d)
        untemplated = client.generate(model="plain", prompt="Once", options=GREEDY)
        assert untemplated.response == reference(tiny_model, "Once", 24)[0]
        assert client.show("plain").template == ""
        with pytest.raises(ollama.ResponseError) as info:
            client.chat(model="plain", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 400 and "chat template" in info.value.error
        client.generate(model="plain", keep_alive=0)
        # No num_predict (or -1): until the context is full, at most the daemon's limit.
        for options in ({"temperature": 0}, {"temperature": 0, "num_predict": -1}):
            out = client.generate(model="tiny", prompt="Once", raw=True, options=options)
            assert out.response == reference(tiny_model, "Once", 40)[0]
            assert out.eval_count == 40 and out.done_reason == "length"
        # An empty prompt loads the model (the daemon preloads its default: reloaded
        # here, it keeps the new keep-alive); with keep_alive 0 it unloads it.
        loaded = client.generate(model="tiny", prompt="", keep_alive="1h")
        assert loaded.done and loaded.done_reason == "load"
        (running,) = client.ps().models
        assert running.model == "tiny" and running.expires_at is not None
        left = running.expires_at.timestamp() - time.time()
        assert 3000 < left <= 3600
        gone = client.generate(model="tiny", keep_alive=0)
        assert gone.done_reason == "unload"
        assert client.ps().models == []
        # A generation with keep_alive 0 unloads it once done (the unload is asynchronous).
        out = client.chat(
            model="tiny", messages=[{"role": "user", "content": "hi"}], options=GREEDY, keep_alive=0
        )
        assert out.eval_count == 24
        deadline = time.monotonic() + 30
        with d.client() as native:
            while any(m.resident for m in native.models()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not any(m.resident for m in native.models())
        assert client.ps().models == []
        assert '"api": "ollama"' in d.log() or '"api":"ollama"' in d.log()
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(d.socket.parent, ignore_errors=True)
        shutil.rmtree(plain.parent, ignore_errors=True)


def test_errors_have_ollamas_shape_and_status(http_daemon: HttpDaemon) -> None:
    client = sdk(http_daemon)
    for call in (
        lambda: client.generate(model="nope", prompt="hi"),
        lambda: client.generate(model="nope", prompt="hi", stream=True).__next__(),
        lambda: client.chat(model="nope", messages=[{"role": "user", "content": "hi"}]),
        lambda: client.show("nope"),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            call()
        assert info.value.status_code == 404 and "nope" in info.value.error

    with pytest.raises(ollama.ResponseError) as info:
        client.pull("tiny")
    assert info.value.status_code == 501 and "not served" in info.value.error
    assert http(http_daemon, "POST", "/api/embed", {"model": "tiny", "input": "x"})[0] == 501
    status, body = http(http_daemon, "GET", "/api/nothing")
    assert status == 404 and "unknown endpoint" in body["error"]
    assert http(http_daemon, "GET", "/api/generate")[0] == 405

    bad = {"model": "tiny", "prompt": "hi", "options": {"temperature": "hot"}}
    status, body = http(http_daemon, "POST", "/api/generate", bad)
    assert status == 400 and "$.options.temperature" in body["error"]
    bad["options"] = {"top_p": 3}
    status, body = http(http_daemon, "POST", "/api/generate", bad)
    assert status == 400 and "$.options.top_p" in body["error"]
    hi = [{"role": "user", "content": "hi"}]
    with_tools = {"model": "tiny", "messages": hi, "tools": [{"type": "function"}]}
    status, body = http(http_daemon, "POST", "/api/chat", with_tools)
    assert status == 400 and "tools" in body["error"]
    status, body = http(http_daemon, "POST", "/api/generate", {"prompt": "hi"})
    assert status == 400 and "model is required" in body["error"]
    req = urllib.request.Request(http_daemon.base_url + "/api/chat", data=b"{nope", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "invalid JSON" in json.loads(err.value.read())["error"]
    # The daemon still serves.
    assert client.generate(model="tiny", prompt="hi", options=GREEDY).eval_count == 24


def test_keep_alive_durations() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(0) == 0 and parse_keep_alive("0") == 0
    assert parse_keep_alive(90) == 90 and parse_keep_alive("90") == 90
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("1.5s") == 1.5 and parse_keep_alive("500ms") == 0.5
    assert parse_keep_alive(-1) == -1 and parse_keep_alive("-5m") == -1
    for bad in ("soon", "5 minutes", "m", ""):
        with pytest.raises(BadRequest):
            parse_keep_alive(bad)


def test_overloaded_is_503_and_a_dropped_stream_is_cancelled(tiny_model: Path) -> None:
    d = start_http_daemon(
        "--model", f"tiny={tiny_model}", "--max-batch-size", "1", "--max-queued", "0"
    )  # fmt: skip
    try:
        body = json.dumps(
            {
                "model": "tiny",
                "prompt": "Go on:",
                "options": {"temperature": 0, "num_predict": 4000},
            }
        ).encode()
        req = urllib.request.Request(d.base_url + "/api/generate", data=body, method="POST")
        stream = urllib.request.urlopen(req, timeout=60)
        first = json.loads(stream.readline())
        assert first["done"] is False and first["model"] == "tiny"
        assert stream.headers["Content-Type"] == "application/x-ndjson"
        # The batch is full and nothing may wait: a second request is refused.
        second = urllib.request.Request(
            d.base_url + "/api/chat",
            data=json.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
            ).encode(),
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(second, timeout=60)
        assert err.value.code == 503 and err.value.headers["Retry-After"] == "1"
        assert "max_queued" in json.loads(err.value.read())["error"]
        # Dropping the stream cancels its request in the worker.
        stream.close()
        with d.client() as native:
            deadline = time.monotonic() + 30
            while native.stats().requests_cancelled < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = native.stats()
            assert stats.requests_cancelled == 1 and stats.active_sequences == 0
        # And it serves again.
        assert sdk(d).generate(model="tiny", prompt="hi", options=GREEDY).eval_count == 24
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(d.socket.parent, ignore_errors=True)
