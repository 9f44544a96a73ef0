"""Structured output over HTTP: OpenAI's ``response_format`` through the ``openai`` SDK and
Ollama's ``format`` through the ``ollama`` SDK; every output validates, a schema that does
not compile is a 400 naming the parameter, and the daemon goes on serving."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import jsonschema
import ollama
import openai
import pytest
from conftest import HttpDaemon
from hypothesis import given
from test_structured import PERSON, SCHEMAS, SETTINGS, check

CHAT = [{"role": "user", "content": "Reply in JSON."}]


@SETTINGS
@given(schema=SCHEMAS)
def test_openai_sdk_json_schema_outputs_validate(
    http_daemon: HttpDaemon, schema: dict[str, Any]
) -> None:
    """20 schemas, 10 sampled chat completions each, at once: every output is valid."""
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }

    async def main() -> list[Any]:
        sdk = openai.AsyncOpenAI(
            base_url=f"{http_daemon.base_url}/v1", api_key="unused", max_retries=0
        )
        async with sdk:
            return await asyncio.gather(
                *(
                    sdk.chat.completions.create(
                        model="tiny",
                        messages=CHAT,  # type: ignore[arg-type]
                        response_format=response_format,
                        max_tokens=400,
                        temperature=1.0,
                        seed=i,
                        extra_body={"cache": False},
                    )
                    for i in range(10)
                )
            )

    for got in anyio.run(main):
        choice = got.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        check(choice.message.content or "", schema)


@pytest.fixture
def sdk(http_daemon: HttpDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http_daemon.base_url}/v1", api_key="unused", max_retries=0)


def test_openai_json_object_and_completions(sdk: openai.OpenAI) -> None:
    got = sdk.chat.completions.create(
        model="tiny", messages=CHAT, response_format={"type": "json_object"}, max_tokens=60
    )  # type: ignore[call-overload]
    text = got.choices[0].message.content or ""
    assert text.startswith("{")
    if got.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    done = sdk.completions.create(
        model="tiny",
        prompt="JSON:",
        max_tokens=200,
        temperature=1.0,
        seed=3,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
    )
    assert done.choices[0].finish_reason == "stop"
    check(done.choices[0].text, PERSON)
    plain = sdk.chat.completions.create(
        model="tiny", messages=CHAT, response_format={"type": "text"}, max_tokens=8
    )  # type: ignore[call-overload]
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_openai_schema_that_does_not_compile_is_a_400_naming_it(sdk: openai.OpenAI) -> None:
    bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tiny", messages=CHAT, response_format=bad)  # type: ignore[arg-type]
    assert info.value.param == "response_format.json_schema.schema"
    assert "cannot be compiled" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model="tiny",
            messages=CHAT,
            response_format={"type": "xml"},  # type: ignore[arg-type]
        )
    assert info.value.param == "response_format.type"
    ok = sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_ollama_format_json_and_schema(http_daemon: HttpDaemon) -> None:
    client = ollama.Client(host=http_daemon.base_url, timeout=120)
    for seed in range(4):
        options = {"temperature": 1.0, "seed": seed, "num_predict": 200}
        chat = client.chat(model="tiny", messages=CHAT, format=PERSON, options=options)
        assert chat.done_reason == "stop"
        jsonschema.validate(json.loads(chat.message.content or ""), PERSON)
        gen = client.generate(model="tiny", prompt="JSON:", format=PERSON, options=options)
        jsonschema.validate(json.loads(gen.response), PERSON)
    gen = client.generate(model="tiny", prompt="JSON:", format="json", options={"num_predict": 60})
    assert gen.response.startswith("{")
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="tiny", prompt="JSON:", format={"type": "nope"})
    assert info.value.status_code == 400 and "cannot be compiled" in info.value.error
    assert client.generate(model="tiny", prompt="hi", options={"num_predict": 4}).done
