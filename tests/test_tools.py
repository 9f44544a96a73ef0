"""Tool calls through the native protocol and the ``openai`` SDK, on the marker test models
(mlx-lm picks its ``json_tools`` parser for "hermes", ``qwen3_coder`` for "qwen3").

A random-weight model calls no tool on its own. A forced call (``tool_choice`` required or
a function) is JSON held to the schema by the constraint engine; a call in the model's own
format is forced here by a native ``format`` grammar that spells it (special tokens and
all), so the daemon's reading of it goes through mlx-lm's real parser.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from conftest import HttpDaemon
from helpers import _load

from mlxd.client import Chunk, Client, InvalidRequestError

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"enum": ["C", "F"]},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"enum": ["UTC", "CET"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# The models' own formats, spelled out: Hermes' JSON and Qwen3-Coder's XML.
NATIVE = {
    "hermes": '<tool_call> "\\n{\\"name\\": \\"get_time\\", \\"arguments\\": '
    '{\\"tz\\": \\"UTC\\"}}\\n" </tool_call>',
    "qwen3": '<tool_call> "\\n<function=get_weather>\\n<parameter=city>\\nParis\\n</parameter>\\n'
    '<parameter=days>\\n3\\n</parameter>\\n</function>\\n" </tool_call>',
}
NATIVE_CALL = {
    "hermes": ("get_time", {"tz": "UTC"}),
    "qwen3": ("get_weather", {"city": "Paris", "days": 3}),  # "3" typed by the schema
}


@pytest.fixture(scope="module")
def sdk(tools_daemon: HttpDaemon) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{tools_daemon.base_url}/v1", api_key="x", max_retries=0)
    yield client
    client.close()


def _stream(c: Client, **options: Any) -> tuple[list[Chunk], Any]:
    chunks, done = [], None
    for m in c.stream(**options):
        if isinstance(m, Chunk):
            chunks.append(m)
        else:
            done = m
    return chunks, done


# ----------------------------------------------------------------- forced calls


@pytest.mark.parametrize("model", ["hermes", "qwen3"])
def test_a_named_tool_choice_returns_a_valid_call_for_every_request(
    tools_daemon: HttpDaemon, model: str
) -> None:
    with tools_daemon.client() as c:
        for seed in range(12):
            r = c.chat(
                ASK, model=model, tools=TOOLS, tool_choice={"name": "get_weather"},
                temperature=1.0, seed=seed, max_tokens=80,
            )  # fmt: skip
            assert r.done.finish_reason == "tool_calls", r
            assert r.text == "" and len(r.tool_calls) == 1, r
            call = r.tool_calls[0]
            assert call.name == "get_weather" and call.id.startswith("call_")
            jsonschema.validate(call.arguments, WEATHER)


def test_required_makes_a_call_of_an_offered_tool(tools_daemon: HttpDaemon) -> None:
    with tools_daemon.client() as c:
        names = set()
        for seed in range(8):
            # parallel_tool_calls false: exactly one (a random model may go on calling).
            r = c.chat(
                ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                temperature=1.0, seed=seed, max_tokens=120,
            )  # fmt: skip
            assert r.done.finish_reason == "tool_calls" and len(r.tool_calls) == 1, r
            (call,) = r.tool_calls
            jsonschema.validate(call.arguments, SCHEMAS[call.name])
            names.add(call.name)
        assert names == {"get_weather", "get_time"}  # the choice is the model's
        # Greedy, several calls in one list, each its own id.
        r = c.chat(ASK, tools=TOOLS, tool_choice="required", max_tokens=200)
        if r.done.finish_reason == "tool_calls":
            assert len({call.id for call in r.tool_calls}) == len(r.tool_calls) >= 1


# ----------------------------------------------------------------- the model's own format


@pytest.mark.parametrize("model", ["hermes", "qwen3"])
def test_a_call_in_the_model_s_own_format_is_read_by_its_mlx_lm_parser(
    tools_daemon: HttpDaemon, model: str
) -> None:
    grammar = f'start: "Let me check. " {NATIVE[model]} " Done."'
    with tools_daemon.client() as c:
        chunks, done = _stream(
            c, messages=ASK, model=model, tools=TOOLS, think=False if model == "qwen3" else None,
            format={"type": "grammar", "lark": grammar}, max_tokens=80,
        )  # fmt: skip
    calls = [(call.name, call.arguments) for ch in chunks for call in ch.tool_calls or ()]
    assert calls == [NATIVE_CALL[model]]
    text = "".join(ch.text for ch in chunks)
    assert text == "Let me check.  Done."  # the call's text is in no channel
    assert done.finish_reason == "tool_calls"
    # The call comes in the chunk of the token that ended it (the end marker).
    (with_call,) = [ch for ch in chunks if ch.tool_calls]
    assert with_call.tokens and with_call.text == ""


def test_text_that_does_not_read_as_a_call_is_given_back_as_text(
    tools_daemon: HttpDaemon,
) -> None:
    grammar = 'start: <tool_call> "\\nnot a call\\n" </tool_call>'
    with tools_daemon.client() as c:
        r = c.chat(ASK, tools=TOOLS, format={"type": "grammar", "lark": grammar}, max_tokens=40)
    assert r.tool_calls == [] and r.done.finish_reason == "stop"
    assert r.text == "<tool_call>\nnot a call\n</tool_call>"


def test_without_tools_the_markers_are_plain_text(tools_daemon: HttpDaemon) -> None:
    grammar = f"start: {NATIVE['hermes']}"
    with tools_daemon.client() as c:
        r = c.chat(ASK, format={"type": "grammar", "lark": grammar}, max_tokens=40)
    assert r.tool_calls == [] and r.done.finish_reason == "stop"
    assert r.text.startswith("<tool_call>\n{") and r.text.endswith("</tool_call>")


def test_tool_choice_none_bans_the_start_of_a_call(
    tools_daemon: HttpDaemon, hermes_model: Path
) -> None:
    _, tokenizer = _load(str(hermes_model))
    (start,) = tokenizer.tool_call_start_tokens
    push = {start: 100.0}  # the model would start a call at once
    with tools_daemon.client() as c:
        auto = c.chat(ASK, tools=TOOLS, logit_bias=push, max_tokens=6)
        none = c.chat(ASK, tools=TOOLS, tool_choice="none", logit_bias=push, max_tokens=6)
    assert auto.tokens[0] == start  # the bias does what this test needs
    assert start not in none.tokens and none.tool_calls == []


def test_tools_reach_the_chat_template_and_greedy_output_is_mlx_lm_s(
    tools_daemon: HttpDaemon, hermes_model: Path
) -> None:
    from mlx_lm import stream_generate

    model, tokenizer = _load(str(hermes_model))
    prompt = tokenizer.apply_chat_template(ASK, tools=TOOLS, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(ASK, add_generation_prompt=True)
    assert len(prompt) > len(without)
    ids = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12)]
    with tools_daemon.client() as c:
        r = c.chat(ASK, tools=TOOLS, max_tokens=12, cache=False)
    assert r.done.usage.prompt_tokens == len(prompt)
    assert r.tokens == ids


# ----------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"model": "tiny", "tools": TOOLS}, "$.tools"),
        ({"tools": TOOLS, "tool_choice": {"name": "nope"}}, "$.tool_choice.name"),
        ({"tool_choice": "required"}, "$.tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "format": {"type": "json"}}, "$.format"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "$.tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
          "tool_choice": {"name": "f"}}, "$.tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "$.tools[0].function.name"),
        ({"tools": [{"type": "other", "function": {"name": "f"}}]}, "$.tools[0].type"),
    ],
)  # fmt: skip
def test_bad_tools_are_refused_naming_the_field(
    tools_daemon: HttpDaemon, options: dict[str, Any], field: str
) -> None:
    with tools_daemon.client() as c:
        with pytest.raises(InvalidRequestError) as info:
            c.chat(ASK, max_tokens=4, **options)
        assert info.value.field == field, info.value
        assert c.chat(ASK, max_tokens=2).done.finish_reason == "length"  # still serving


def test_tools_go_with_messages(tools_daemon: HttpDaemon) -> None:
    with tools_daemon.client() as c, pytest.raises(InvalidRequestError) as info:
        c.generate("hi", tools=TOOLS, max_tokens=4)
    assert info.value.field == "$.tools"


# ----------------------------------------------------------------- a tool round trip


@pytest.mark.parametrize("model", ["hermes", "qwen3"])
def test_a_tool_round_trip_natively_hits_the_cache(
    tools_daemon: HttpDaemon, hermes_model: Path, qwen3_model: Path, model: str
) -> None:
    with tools_daemon.client() as c:
        first = c.chat(ASK, model=model, tools=TOOLS, tool_choice={"name": "get_time"},
                       max_tokens=40)  # fmt: skip
        (call,) = first.tool_calls
        history = [
            *ASK,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"time": "12:00"}', "tool_call_id": call.id,
             "name": call.name},
        ]  # fmt: skip
        second = c.chat(history, model=model, tools=TOOLS, max_tokens=4)
    _, tokenizer = _load(str({"hermes": hermes_model, "qwen3": qwen3_model}[model]))
    rendered_call = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.name, "arguments": call.arguments}}]}]  # fmt: skip
    key = tokenizer.apply_chat_template(rendered_call, tools=TOOLS)
    # The second turn starts from the whole first one, the call as the template writes it.
    assert second.done.cache.kind == "shorter", second.done
    assert second.done.usage.cached_tokens == len(key)


# ----------------------------------------------------------------- the openai SDK


def test_openai_named_tool_choice_whole_and_streamed(sdk: openai.OpenAI) -> None:
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    got = sdk.chat.completions.create(
        model="qwen3", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80,  # type: ignore[arg-type]
    )  # fmt: skip
    message = got.choices[0].message
    assert got.choices[0].finish_reason == "tool_calls"
    assert message.content is None and message.tool_calls
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    stream = sdk.chat.completions.create(
        model="qwen3", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80,  # type: ignore[arg-type]
        stream=True,
    )  # fmt: skip
    fragments: dict[int, list[Any]] = {}
    finish = None
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            fragments.setdefault(delta.index, []).append(delta)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls" and list(fragments) == [0]
    parts = fragments[0]
    assert len(parts) > 1 and parts[0].id and parts[0].function.name == "get_weather"
    assert all(p.id is None for p in parts[1:])
    arguments = "".join(p.function.arguments or "" for p in parts)
    assert arguments == call.function.arguments  # greedy: the same call, in pieces


def test_openai_two_round_tool_conversation_reports_cached_tokens(sdk: openai.OpenAI) -> None:
    messages: list[Any] = list(ASK)
    first = sdk.chat.completions.create(
        model="hermes", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=120,  # type: ignore[arg-type]
        parallel_tool_calls=False,
    )  # fmt: skip
    reply = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and reply.tool_calls
    messages.append(reply.model_dump(exclude_none=True))
    for call in reply.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
    second = sdk.chat.completions.create(
        model="hermes", messages=messages, tools=TOOLS, max_tokens=8,  # type: ignore[arg-type]
    )  # fmt: skip
    assert second.choices[0].message.content is not None
    usage, before = second.usage, first.usage
    assert usage is not None and before is not None
    cached = usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    # At least the first round's prompt and its call: all but the tool turn is a hit.
    assert cached >= before.prompt_tokens + 1, usage
    assert usage.prompt_tokens - cached < 20, usage


def test_openai_tools_on_a_model_without_tool_calling_is_a_400(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=4)  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert "does not support tool calling" in str(info.value)
    assert info.value.body["param"] == "tools"  # type: ignore[index]


def test_openai_a_call_s_arguments_must_be_json_object_text(sdk: openai.OpenAI) -> None:
    bad: Any = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_time", "arguments": "[1, 2]"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
    ]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="hermes", messages=bad, tools=TOOLS, max_tokens=4)  # type: ignore[arg-type]
    assert info.value.body["param"] == "messages[1].tool_calls[0].function.arguments"  # type: ignore[index]


def test_a_warm_up_with_tools_is_the_prefix_of_a_chat_that_offers_them(
    tools_daemon: HttpDaemon,
) -> None:
    system = [{"role": "system", "content": "You are a weather bot. " * 8}]
    with tools_daemon.client() as c:
        warmed = c.warm(messages=system, tools=TOOLS, model="qwen3")
        r = c.chat([*system, *ASK], tools=TOOLS, model="qwen3", max_tokens=2)
    assert r.done.cache.kind == "shorter"
    assert r.done.usage.cached_tokens == warmed.usage.prompt_tokens
