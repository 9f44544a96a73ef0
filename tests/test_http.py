"""The HTTP listener: one daemon serves the native socket and HTTP from one engine."""

from __future__ import annotations

import openai
from conftest import HttpDaemon


def test_openai_sdk_lists_the_models_a_native_client_sees(http_daemon: HttpDaemon) -> None:
    sdk = openai.OpenAI(base_url=f"{http_daemon.base_url}/v1", api_key="unused")
    listed = sorted(m.id for m in sdk.models.list())
    with http_daemon.client() as native:
        assert listed == sorted(m.name for m in native.models())
