"""Tool calls through the Ollama API against a real daemon, with the tiny hermes and qwen3
marker models (mlx-lm finds their tool-call formats) and the plain tiny model (none).

A random-weight model never calls a tool by itself, so calls are forced with the mlxd
extension ``options.tool_choice`` (constrained JSON). The schemas are closed
(``additionalProperties: false``) and bounded so random weights finish the arguments:
the ``ollama`` SDK's ``Tool`` type cannot carry those keywords (it drops them), so the
forcing rounds are posted as plain JSON and their replies read with the SDK's own
``ChatResponse``; the rounds after them go through ``ollama.Client``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import jsonschema
import ollama
import pytest
from conftest import HttpDaemon

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": name, "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def post(d: HttpDaemon, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(
        d.base_url + "/api/chat", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def forced(model: str, choice: Any, stream: bool, messages: list[Any] = ASK) -> dict[str, Any]:
    # One call at most: a random-weight model may go on adding calls to a list.
    options = {"tool_choice": choice, "parallel_tool_calls": False, "num_predict": 80}
    return {"model": model, "messages": messages, "tools": TOOLS, "options": options,
            "stream": stream, "think": False if model == "qwen3" else None}  # fmt: skip


def check_calls(calls: Any, names: set[str]) -> None:
    assert calls, "no tool_calls"
    for call in calls:
        assert call.function.name in names
        jsonschema.validate(dict(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("model", ["hermes", "qwen3"])
def test_a_forced_call_is_message_tool_calls(tools_daemon: HttpDaemon, model: str) -> None:
    for choice, names in (({"name": "get_weather"}, {"get_weather"}), ("required", set(SCHEMAS))):
        status, raw = post(tools_daemon, forced(model, choice, stream=False))
        assert status == 200, raw
        reply = ollama.ChatResponse.model_validate_json(raw)
        assert reply.done and reply.done_reason == "stop"  # as Ollama's own API says
        assert reply.message.content == ""  # the call's text is not answer text
        check_calls(reply.message.tool_calls, names)
        assert all(c["id"].startswith("call_") for c in json.loads(raw)["message"]["tool_calls"])

        status, raw = post(tools_daemon, forced(model, choice, stream=True))
        assert status == 200, raw
        lines = [json.loads(line) for line in raw.splitlines()]
        parts = [ollama.ChatResponse.model_validate(line) for line in lines]
        with_calls = [p for p in parts if p.message.tool_calls]
        assert len(with_calls) >= 1 and not with_calls[-1].done  # sent in their chunk
        check_calls([c for p in with_calls for c in p.message.tool_calls or ()], names)
        assert parts[-1].done and parts[-1].done_reason == "stop"
        assert (
            not parts[-1].message.tool_calls
            and "".join(p.message.content or "" for p in parts) == ""
        )


def test_two_rounds_through_the_sdk_reuse_the_cache(tools_daemon: HttpDaemon) -> None:
    client = ollama.Client(host=tools_daemon.base_url, timeout=120)
    status, raw = post(tools_daemon, forced("hermes", {"name": "get_weather"}, stream=False))
    assert status == 200, raw
    first = ollama.ChatResponse.model_validate_json(raw)
    assert first.message.tool_calls and first.prompt_eval_count
    # The SDK's Message as it came back (its ToolCall keeps no id: mlxd makes one), then
    # the tool's answer by tool_name, as Ollama's clients send it.
    history = [
        *ASK,
        first.message,
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    sdk_history = [ollama.Message.model_validate(m).model_dump(exclude_none=True) for m in history]
    with tools_daemon.client() as native:
        before = native.stats().cache
        status, raw = post(tools_daemon, {"model": "hermes", "messages": sdk_history,
                                          "tools": TOOLS, "stream": False,
                                          "options": {"num_predict": 4}})  # fmt: skip
        after = native.stats().cache
    assert status == 200, raw
    second = ollama.ChatResponse.model_validate_json(raw)
    assert second.prompt_eval_count and second.prompt_eval_count > first.prompt_eval_count
    # Ollama's replies have no cached-token count: the daemon's own cache stats tell.
    assert before is not None and after is not None
    assert after.tokens_reused - before.tokens_reused >= first.prompt_eval_count

    # The same second round through ollama.Client (its Tool type drops the closed-schema
    # keywords, so the tools' prompt text differs from the first round's).
    reply = client.chat(model="hermes", messages=history, tools=TOOLS, options={"num_predict": 4})
    assert reply.done and reply.eval_count == 4 and reply.message.role == "assistant"


def test_tool_turns_render_as_native_ones(tools_daemon: HttpDaemon) -> None:
    call = {"id": "call_1", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}
    ollama_turns = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "content": "12:00", "tool_name": "get_time",
                     "tool_call_id": "call_1"}]  # fmt: skip
    native_turns = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "call_1", "name": "get_time", "arguments": {"tz": "UTC"}}]},
                    {"role": "tool", "content": "12:00", "name": "get_time",
                     "tool_call_id": "call_1"}]  # fmt: skip
    for model in ("hermes", "qwen3"):
        body = {"model": model, "messages": ollama_turns, "tools": TOOLS, "stream": False,
                "options": {"num_predict": 1}}  # fmt: skip
        status, raw = post(tools_daemon, body)
        assert status == 200, raw
        with tools_daemon.client() as native:
            ref = native.chat(native_turns, model=model, tools=TOOLS, max_tokens=1)
        assert ref.done.usage is not None
        assert json.loads(raw)["prompt_eval_count"] == ref.done.usage.prompt_tokens


def test_refusals(tools_daemon: HttpDaemon) -> None:
    client = ollama.Client(host=tools_daemon.base_url, timeout=120)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="tiny", messages=ASK, tools=TOOLS)
    assert caught.value.status_code == 400
    assert "does not support tool calling" in caught.value.error
    bad_tool = [{"type": "function", "function": {"name": ""}}]
    text_arguments = {"function": {"name": "get_time", "arguments": "UTC"}}
    bad_call = [{"role": "assistant", "content": "", "tool_calls": [text_arguments]}]
    for body, field in (
        ({"messages": ASK, "tools": bad_tool}, "$.tools[0].function.name"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "$.messages[0].role"),
        ({"messages": bad_call}, "$.messages[0].tool_calls[0].function.arguments"),
        ({"messages": ASK, "options": {"tool_choice": "sometimes"}}, "$.options.tool_choice"),
        ({"messages": ASK, "tools": TOOLS, "options": {"tool_choice": {"name": "nope"}}},
         "no tool named"),
    ):  # fmt: skip
        status, raw = post(tools_daemon, {"model": "hermes", "stream": False, **body})
        assert status == 400 and field in json.loads(raw)["error"], (field, raw)


def test_show_lists_tools_and_thinking(tools_daemon: HttpDaemon) -> None:
    client = ollama.Client(host=tools_daemon.base_url, timeout=120)
    assert client.show("hermes").capabilities == ["completion", "tools", "insert"]
    assert client.show("qwen3").capabilities == ["completion", "tools", "insert", "thinking"]
    assert client.show("tiny").capabilities == ["completion", "insert"]
