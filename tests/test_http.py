"""The HTTP listener: one daemon serves the native socket and HTTP from one engine."""

from __future__ import annotations

from pathlib import Path

import openai
from conftest import HttpDaemon
from helpers import chat_tokens


def test_openai_sdk_lists_the_models_a_native_client_sees(http_daemon: HttpDaemon) -> None:
    sdk = openai.OpenAI(base_url=f"{http_daemon.base_url}/v1", api_key="unused")
    listed = sorted(m.id for m in sdk.models.list())
    with http_daemon.client() as native:
        assert listed == sorted(m.name for m in native.models())


def test_native_and_http_chat_turns_share_one_prompt_cache(
    http_daemon: HttpDaemon, tiny_model: Path
) -> None:
    """A turn over one front end starts from the state the other front end's turn left."""
    sdk = openai.OpenAI(base_url=f"{http_daemon.base_url}/v1", api_key="unused", max_retries=0)
    first = [{"role": "user", "content": "Which front end am I talking to today?"}]
    with http_daemon.client() as native:
        native.clear_cache()
        reply = native.chat(first, max_tokens=12)
        assert reply.done.usage is not None and reply.done.usage.cached_tokens == 0
        # Native turn 1, then HTTP turn 2: the HTTP request reuses the native reply's state.
        second = [*first, {"role": "assistant", "content": reply.text},
                  {"role": "user", "content": "And now?"}]  # fmt: skip
        over_http = sdk.chat.completions.create(model="tiny", messages=second, max_tokens=12)  # type: ignore[arg-type]
        assert over_http.usage is not None and over_http.usage.prompt_tokens_details is not None
        cached = over_http.usage.prompt_tokens_details.cached_tokens
        assert cached is not None and cached >= len(chat_tokens(tiny_model, first))
        # HTTP turn 2, then native turn 3: the native request reuses the HTTP reply's state.
        third = [*second, {"role": "assistant", "content": over_http.choices[0].message.content},
                 {"role": "user", "content": "Once more."}]  # fmt: skip
        again = native.chat(third, max_tokens=4)  # type: ignore[arg-type]
        assert again.done.usage is not None
        assert again.done.usage.cached_tokens >= len(chat_tokens(tiny_model, second))
