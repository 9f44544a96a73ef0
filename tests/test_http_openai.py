"""The OpenAI API, through the official ``openai`` SDK, against a real daemon: greedy text
equals mlx-lm in-process, usage equals the native path's, bad input gets OpenAI's errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import HttpDaemon, start_http_daemon, wait_idle
from helpers import RawConn, chat_tokens, fim_tokens, reference

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Write a haiku about sockets."}]


@pytest.fixture
def sdk(http_daemon: HttpDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http_daemon.base_url}/v1", api_key="unused", max_retries=0)


def test_models_list(sdk: openai.OpenAI) -> None:
    models = {m.id: m for m in sdk.models.list()}
    assert set(models) == {"tiny", "tiny-b"}
    assert models["tiny"].object == "model" and models["tiny"].owned_by == "mlxd"


def test_completion_equals_mlx_lm_and_native_usage(
    sdk: openai.OpenAI, http_daemon: HttpDaemon, tiny_model: Path
) -> None:
    text, ids = reference(tiny_model, PROMPT, 24)
    got = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.object == "text_completion" and got.model == "tiny"
    assert got.choices[0].text == text
    assert got.choices[0].finish_reason == ("length" if len(ids) == 24 else "stop")
    with http_daemon.client() as native:
        done = native.generate(PROMPT, max_tokens=24).done
    assert done.usage is not None and got.usage is not None
    assert got.usage.prompt_tokens == done.usage.prompt_tokens
    assert got.usage.completion_tokens == done.usage.completion_tokens == len(ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.usage.prompt_tokens_details is not None


def test_completion_default_model_and_token_prompt(sdk: openai.OpenAI, tiny_model: Path) -> None:
    ids = chat_tokens(tiny_model, CHAT)
    text, _ = reference(tiny_model, ids, 16)
    got = sdk.completions.create(model="", prompt=ids, max_tokens=16, extra_body={"cache": False})
    assert got.model == "tiny"  # the model served, the default one
    assert got.choices[0].text == text
    assert got.usage is not None and got.usage.prompt_tokens == len(ids)


def test_completion_streamed_with_usage(sdk: openai.OpenAI, tiny_model: Path) -> None:
    text, ids = reference(tiny_model, PROMPT, 32)
    stream = sdk.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop") and not any(finishes[:-1])
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_completion_suffix_is_fill_in_the_middle(sdk: openai.OpenAI, tiny_model: Path) -> None:
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    text, _ = reference(tiny_model, fim_tokens(tiny_model, prefix, suffix), 16)
    got = sdk.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=16)
    assert got.choices[0].text == text


def test_sampling_fields_reach_the_sampler(
    sdk: openai.OpenAI, http_daemon: HttpDaemon, tiny_model: Path
) -> None:
    _, ids = reference(tiny_model, PROMPT, 4)
    forced = (ids[0] + 7) % 100 + 3
    opts: dict[str, Any] = {"max_tokens": 8, "stop": ["e"]}
    got = sdk.completions.create(
        model="tiny",
        prompt=PROMPT,
        logit_bias={str(forced): 100},
        extra_body={"top_k": 5, "repetition_penalty": 1.3},
        **opts,
    )
    with http_daemon.client() as native:
        want = native.generate(
            PROMPT, logit_bias={forced: 100}, top_k=5, repetition_penalty=1.3, **opts
        )
    assert want.tokens[0] == forced
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.done.finish_reason


def test_chat_equals_mlx_lm_and_native_usage(
    sdk: openai.OpenAI, http_daemon: HttpDaemon, tiny_model: Path
) -> None:
    parts = [{"type": "text", "text": "Write a haiku "}, {"type": "text", "text": "about sockets."}]
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": parts},
    ]
    as_native = [{"role": "system", "content": "Be brief."}, *CHAT]
    prompt_ids = chat_tokens(tiny_model, as_native)
    text, ids = reference(tiny_model, prompt_ids, 32)
    got = sdk.chat.completions.create(
        model="tiny", messages=messages, max_tokens=99, max_completion_tokens=32, temperature=0
    )  # type: ignore[arg-type]
    assert got.object == "chat.completion" and got.model == "tiny"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == text
    with http_daemon.client() as native:
        done = native.chat(as_native, max_tokens=32).done
    assert got.usage is not None and done.usage is not None
    assert got.usage.prompt_tokens == done.usage.prompt_tokens == len(prompt_ids)
    assert got.usage.completion_tokens == done.usage.completion_tokens == len(ids)


def test_chat_streamed_deltas(
    sdk: openai.OpenAI, http_daemon: HttpDaemon, tiny_model: Path
) -> None:
    text, ids = reference(tiny_model, chat_tokens(tiny_model, CHAT), 32)
    chunks = list(
        sdk.chat.completions.create(
            model="tiny",
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.model == "tiny" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ids)
    # On the wire: server-sent events ending in ``data: [DONE]``.
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "stream": True}
    raw = httpx.post(f"{http_daemon.base_url}/v1/chat/completions", json=body, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().split("\n\n")[-1] == "data: [DONE]"


def test_second_chat_turn_reports_the_first_as_cached(
    sdk: openai.OpenAI, http_daemon: HttpDaemon
) -> None:
    with http_daemon.client() as native:
        native.clear_cache("tiny")
    turn = [{"role": "user", "content": "Tell me about the prompt cache of mlxd."}]
    first = sdk.chat.completions.create(model="tiny", messages=turn, max_tokens=16)  # type: ignore[arg-type]
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And again?"},
    ]
    second = sdk.chat.completions.create(model="tiny", messages=turn, max_tokens=8)  # type: ignore[arg-type]
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def _refused(call: Any, status: int, param: str | None) -> dict[str, Any]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == status
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    assert body["message"] and body["type"]
    return body


def test_bad_input_gets_openai_errors(sdk: openai.OpenAI, http_daemon: HttpDaemon) -> None:
    chat = sdk.chat.completions.create
    msgs: Any = CHAT
    body = _refused(lambda: chat(model="tiny", messages=msgs, n=2), 400, "n")
    assert body["type"] == "invalid_request_error"
    _refused(lambda: sdk.completions.create(model="tiny", prompt="x", n=3), 400, "n")
    body = _refused(lambda: chat(model="nope", messages=msgs), 404, None)
    assert body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        chat(model="nope", messages=msgs, stream=True)
    _refused(
        lambda: chat(model="tiny", messages=msgs, presence_penalty=0.5), 400, "presence_penalty"
    )
    _refused(lambda: chat(model="tiny", messages=msgs, top_logprobs=2), 400, "top_logprobs")
    tools: Any = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    _refused(lambda: chat(model="tiny", messages=msgs, tools=tools), 400, "tools")
    image: Any = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
    ]
    _refused(lambda: chat(model="tiny", messages=image), 400, "messages[0].content[0].type")
    function_role: Any = [{"role": "function", "content": "x", "name": "f"}]
    _refused(lambda: chat(model="tiny", messages=function_role), 400, "messages[0].role")
    with_type = {"extra_body": {"temperature": "hot"}}
    _refused(lambda: chat(model="tiny", messages=msgs, **with_type), 400, "temperature")
    _refused(lambda: chat(model="tiny", messages=msgs, top_p=3), 400, "top_p")
    _refused(lambda: sdk.completions.create(model="tiny", prompt=[["a"]]), 400, "prompt")  # type: ignore[list-item]
    _refused(lambda: sdk.completions.create(model="tiny", prompt=[10**9]), 400, "prompt")
    # Malformed JSON and a missing field, on the wire.
    url = f"{http_daemon.base_url}/v1/chat/completions"
    bad = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(url, json={"model": "tiny"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    # Unknown fields are ignored; the daemon still serves.
    ok = httpx.post(url, json={"messages": CHAT, "max_tokens": 2, "frobnicate": 1}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_overloaded_is_503_with_retry_after_and_too_long_is_400(
    tiny_model: Path,
) -> None:
    d = start_http_daemon(
        "--model", f"tiny={tiny_model}", "--max-batch-size", "1", "--max-queued", "1",
        "--max-prompt-tokens", "64",
    )  # fmt: skip
    try:
        sdk = openai.OpenAI(base_url=f"{d.base_url}/v1", api_key="unused", max_retries=0)
        long: Any = [{"role": "user", "content": "sockets " * 200}]
        body = _refused(lambda: sdk.chat.completions.create(model="tiny", messages=long), 400, None)
        assert body["code"] == "prompt_too_long"
        conn = RawConn(d.socket)
        for i in range(2):  # one running, one queued: the queue is full
            conn.send({"type": "generate", "id": i, "prompt": "x", "max_tokens": 3000})
        seen = set()
        while seen != {"chunk", "queued"}:
            seen.add(conn.recv()["type"])
        with pytest.raises(openai.APIStatusError) as info:
            sdk.completions.create(model="tiny", prompt="y", max_tokens=2, stream=True)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"].isdigit()
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "overloaded"
        conn.close()
        with d.client() as native:
            wait_idle(native)  # the disconnect's cancels are asynchronous
        # Served again once there is room.
        got = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=8)
        assert got.choices[0].text == reference(tiny_model, PROMPT, 8)[0]
    finally:
        assert d.stop() == 0, d.log()
        shutil.rmtree(d.socket.parent, ignore_errors=True)


def test_a_client_leaving_mid_stream_cancels_its_request(
    sdk: openai.OpenAI, http_daemon: HttpDaemon, tiny_model: Path
) -> None:
    with http_daemon.client() as native:
        before = native.stats().requests_cancelled
        stream = sdk.chat.completions.create(
            model="tiny",
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=3000,
            stream=True,
            extra_body={"cache": False},
        )
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        stream.close()
        wait_idle(native)
        assert native.stats().requests_cancelled == before + 1
    # The daemon keeps serving, token for token.
    got = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=8)
    assert got.choices[0].text == reference(tiny_model, PROMPT, 8)[0]
