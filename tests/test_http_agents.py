"""The agent APIs: OpenAI's Responses API and Anthropic's Messages API, through the real
``openai`` and ``anthropic`` SDKs against a real daemon. Greedy text equals mlx-lm's for
the same chat, template applied."""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from conftest import HttpDaemon, wait_idle
from helpers import chat_tokens, reference

SYSTEM = "You are terse."
QUESTION = "Write a haiku about sockets."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]

RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]

MESSAGE_EVENTS = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]


def _openai(d: HttpDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{d.base_url}/v1", api_key="unused", max_retries=0)


def _anthropic(d: HttpDaemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=d.base_url, api_key="x", max_retries=0)


def _dedup(kinds: list[str]) -> list[str]:
    """Runs of the same event type as one (the many deltas)."""
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


def test_responses_create_equals_mlx_lm(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    prompt = chat_tokens(tiny_model, CHAT)
    text, ids = reference(tiny_model, prompt, 24)
    r = _openai(http_daemon).responses.create(
        model="tiny", instructions=SYSTEM, input=QUESTION, max_output_tokens=24, temperature=0
    )
    assert r.output_text == text
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage is not None
    assert r.usage.input_tokens == len(prompt) and r.usage.output_tokens == len(ids)
    assert r.usage.total_tokens == len(prompt) + len(ids)
    assert r.usage.input_tokens_details.cached_tokens <= len(prompt)
    if len(ids) == 24:  # cut at max_output_tokens, as OpenAI reports it
        assert r.status == "incomplete" and r.incomplete_details is not None
        assert r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed"


def test_responses_message_items_and_developer_role(
    http_daemon: HttpDaemon, tiny_model: Path
) -> None:
    history = [
        {"role": "developer", "content": SYSTEM},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"role": "user", "content": QUESTION},
    ]
    rendered = [{**m, "role": "system"} if m["role"] == "developer" else m for m in history]
    flat = [
        {
            "role": m["role"],
            "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"],
        }
        for m in rendered
    ]
    text, _ = reference(tiny_model, chat_tokens(tiny_model, flat), 16)
    r = _openai(http_daemon).responses.create(model="tiny", input=history, max_output_tokens=16)
    assert r.output_text == text


def test_responses_stream_events_in_order(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    text, ids = reference(tiny_model, chat_tokens(tiny_model, CHAT), 24)
    stream = _openai(http_daemon).responses.create(
        model="tiny", instructions=SYSTEM, input=QUESTION, max_output_tokens=24, stream=True
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert _dedup(kinds) == [*RESPONSE_EVENTS, "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == text
    assert events[-4].text == text  # response.output_text.done
    final = events[-1].response
    assert final.output_text == text
    assert final.usage is not None and final.usage.output_tokens == len(ids)
    assert final.status == ("incomplete" if len(ids) == 24 else "completed")


def test_responses_sdk_stream_helper(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    text, _ = reference(tiny_model, chat_tokens(tiny_model, CHAT), 24)
    with _openai(http_daemon).responses.stream(
        model="tiny", instructions=SYSTEM, input=QUESTION, max_output_tokens=24
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == text


def test_responses_refusals(http_daemon: HttpDaemon) -> None:
    sdk = _openai(http_daemon)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="no-such-model", input="hi", max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.responses.create(model="tiny", input="hi", previous_response_id="resp_1")
    assert bad.value.body["param"] == "previous_response_id"  # type: ignore[index]
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.responses.create(model="tiny", input="hi", tools=[tool])  # type: ignore[list-item]
    assert bad.value.body["param"] == "tools"  # type: ignore[index]
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.responses.create(model="tiny", input=image)  # type: ignore[arg-type]
    assert bad.value.body["param"] == "input[0].content[0]"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.responses.create(model="tiny", input="hi", max_output_tokens="many")  # type: ignore[arg-type]
    assert bad.value.body["param"] == "max_output_tokens"  # type: ignore[index]


def test_messages_create_equals_mlx_lm(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    prompt = chat_tokens(tiny_model, CHAT)
    text, ids = reference(tiny_model, prompt, 24)
    m = _anthropic(http_daemon).messages.create(
        model="tiny",
        system=SYSTEM,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        extra_body={"temperature": 0, "top_k": 0},  # not in this SDK's signature
    )
    assert m.type == "message" and m.role == "assistant" and m.model == "tiny"
    assert len(m.content) == 1 and m.content[0].type == "text"
    assert m.content[0].text == text
    assert m.stop_reason == ("max_tokens" if len(ids) == 24 else "end_turn")
    assert m.usage.input_tokens == len(prompt) and m.usage.output_tokens == len(ids)
    assert m.usage.cache_read_input_tokens is not None


def test_messages_text_blocks(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    text, _ = reference(tiny_model, chat_tokens(tiny_model, CHAT), 16)
    m = _anthropic(http_daemon).messages.create(
        model="tiny",
        system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        max_tokens=16,
    )
    assert m.content[0].text == text  # type: ignore[union-attr]


def test_messages_stream_events_in_order(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    text, ids = reference(tiny_model, chat_tokens(tiny_model, CHAT), 24)
    events = list(
        _anthropic(http_daemon).messages.create(
            model="tiny",
            system=SYSTEM,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=24,
            stream=True,
        )
    )
    assert _dedup([e.type for e in events]) == MESSAGE_EVENTS
    deltas = "".join(e.delta.text for e in events if e.type == "content_block_delta")  # type: ignore[union-attr]
    assert deltas == text
    delta = events[-2]
    assert delta.type == "message_delta" and delta.usage.output_tokens == len(ids)
    assert delta.delta.stop_reason == ("max_tokens" if len(ids) == 24 else "end_turn")


def test_messages_stream_helper(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    prompt = chat_tokens(tiny_model, CHAT)
    text, ids = reference(tiny_model, prompt, 24)
    with _anthropic(http_daemon).messages.stream(
        model="tiny",
        system=SYSTEM,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.input_tokens == len(prompt) and final.usage.output_tokens == len(ids)


def test_messages_errors_in_anthropic_shape(http_daemon: HttpDaemon) -> None:
    sdk = _anthropic(http_daemon)
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk.messages.create(model="claude-nonexistent", messages=user, max_tokens=4)  # type: ignore[arg-type]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    # The SDK itself insists on max_tokens; a raw request shows the daemon's answer.
    raw = httpx.post(
        f"{http_daemon.base_url}/v1/messages", json={"model": "tiny", "messages": user}
    )
    assert raw.status_code == 400
    body = raw.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    image = [{"role": "user", "content": [{"type": "image", "source": {}}]}]
    with pytest.raises(anthropic.BadRequestError) as bad:
        sdk.messages.create(model="tiny", messages=image, max_tokens=4)  # type: ignore[arg-type]
    assert "messages[0].content[0]" in bad.value.body["error"]["message"]  # type: ignore[index]


def test_messages_stop_sequences_and_second_turn_cache(
    http_daemon: HttpDaemon, tiny_model: Path
) -> None:
    first = [{"role": "user", "content": "Tell me about pipes."}]
    text, _ = reference(tiny_model, chat_tokens(tiny_model, first), 24)
    stop = text[8:11]
    assert stop.strip(), text
    sdk = _anthropic(http_daemon)
    cut = sdk.messages.create(model="tiny", messages=first, max_tokens=24, stop_sequences=[stop])  # type: ignore[arg-type]
    assert cut.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    with sdk.messages.stream(
        model="tiny", messages=first, max_tokens=24, stop_sequences=[stop]
    ) as s:  # type: ignore[arg-type]
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    whole = sdk.messages.create(model="tiny", messages=first, max_tokens=24)  # type: ignore[arg-type]
    turn = [*first, {"role": "assistant", "content": text}, {"role": "user", "content": "More."}]
    second = sdk.messages.create(model="tiny", messages=turn, max_tokens=8)  # type: ignore[arg-type]
    assert whole.content[0].text == text  # type: ignore[union-attr]
    cached = second.usage.cache_read_input_tokens
    assert cached is not None and cached >= len(chat_tokens(tiny_model, first))
    assert second.usage.input_tokens == len(chat_tokens(tiny_model, turn))
    assert '"api": "anthropic"' in http_daemon.log()  # its request log line


def test_responses_stream_unknown_model_is_a_plain_404(http_daemon: HttpDaemon) -> None:
    with pytest.raises(openai.NotFoundError):
        _openai(http_daemon).responses.create(model="nope", input="hi", stream=True)
    with pytest.raises(anthropic.NotFoundError):
        _anthropic(http_daemon).messages.create(
            model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
def test_dropping_a_stream_cancels_it(http_daemon: HttpDaemon, path: str) -> None:
    with http_daemon.client() as native:
        wait_idle(native)
        before = native.stats().requests_cancelled
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "count:"}]}
    body |= {"max_tokens": 30_000} if path == "/v1/messages" else {"max_output_tokens": 30_000}
    if path == "/v1/responses":
        body["input"] = body.pop("messages")
    with httpx.stream("POST", f"{http_daemon.base_url}{path}", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if "delta" in line:
                break
    with http_daemon.client() as native:
        wait_idle(native)
        assert native.stats().requests_cancelled == before + 1
        assert native.generate("ok", max_tokens=4).done.finish_reason == "length"


def test_malformed_and_oversized_bodies(http_daemon: HttpDaemon) -> None:
    with http_daemon.client() as native:
        limit = native.welcome.max_frame_bytes
    for path in ("/v1/messages", "/v1/responses"):
        url = f"{http_daemon.base_url}{path}"
        bad = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
        big = httpx.post(url, json={"model": "tiny", "input": "x" * limit, "max_tokens": 1})
        assert bad.status_code == 400 and big.status_code == 413
        if path == "/v1/messages":
            assert bad.json()["error"]["type"] == "invalid_request_error"
            assert big.json()["error"]["type"] == "request_too_large"
        else:
            assert bad.json()["error"]["code"] == "invalid_json"
            assert big.json()["error"]["type"] == "invalid_request_error"
