"""Ollama's request bodies and their translation into the native ``Generate``: the body
Structs, ``options``, ``keep_alive`` durations, ``format``, and a chat's messages and
tools (docs/HTTP.md, Ollama API, says what each maps to).

Ollama's tools are OpenAI's shape, passed through to the native ``tools``. Its tool calls
carry no id: an assistant turn's calls given back without one get a fresh native id, so
the history is well formed for every chat template; a ``tool`` turn's ``tool_name`` is
the native ``name``. ``options.tool_choice`` is an mlxd extension (the native
``tool_choice``; ``options.parallel_tool_calls`` too), in ``options`` because Ollama's SDKs
send that mapping as it is.

Threading: pure translation, no I/O; called on the event loop.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from mlxd.protocol import ChatRole, Generate

from .ollama_models import BadRequest
from .tools import new_call_id


class Options(msgspec.Struct):
    """The ``options`` mlxd maps; any other (num_ctx, mirostat, ...) is ignored."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    num_predict: int | None = None
    stop: list[str] | str | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    tool_choice: Any = None
    """An mlxd extension: the native ``tool_choice`` (validated there)."""
    parallel_tool_calls: bool | None = None
    """An mlxd extension: the native ``parallel_tool_calls``."""
    speculative: str | None = None
    """An mlxd extension: the native ``speculative`` (validated there)."""


class CommonBody(msgspec.Struct):
    model: str = ""
    stream: bool = True
    options: Options | None = None
    keep_alive: float | str | None = None
    format: Any = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # only with logprobs


class GenerateBody(CommonBody):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    template: str | None = None
    images: list[Any] | None = None
    context: list[int] | None = None


class CallFunction(msgspec.Struct):
    name: str
    arguments: dict[str, Any] = {}


class MessageToolCall(msgspec.Struct):
    function: CallFunction
    id: str | None = None


class Message(msgspec.Struct):
    role: ChatRole  # as native messages: another role is a 400 naming it
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class ChatBody(CommonBody):
    messages: list[Message] = []
    tools: list[Any] | None = None


_OPTION_NAMES = {
    "temperature": "options.temperature",
    "top_p": "options.top_p",
    "top_k": "options.top_k",
    "min_p": "options.min_p",
    "max_tokens": "options.num_predict",
    "stop": "options.stop",
    "seed": "options.seed",
    "repetition_penalty": "options.repeat_penalty",
    "repetition_context_size": "options.repeat_last_n",
    "tool_choice": "options.tool_choice",
    "parallel_tool_calls": "options.parallel_tool_calls",
    "speculative": "options.speculative",
}


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: float | str | None) -> float | None:
    """Seconds, as the native ``keep_alive`` takes them: a number of seconds, or a Go
    duration string (``"5m"``, ``"1h30m"``, ``"-1s"``); any negative is -1 (forever)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = None
        if seconds is None:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise BadRequest(f"keep_alive {value!r}: expected seconds or a duration like '5m'")
            seconds = sign * sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        seconds = float(value)
    if seconds != seconds:
        raise BadRequest("keep_alive must be a number")
    return -1.0 if seconds < 0 else min(seconds, 10.0 * 365 * 86400)


def _format(value: Any) -> dict[str, Any] | None:
    """Ollama's ``format`` (``"json"`` or a JSON schema) as the native ``format``."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json"}
    if isinstance(value, dict):
        return {"type": "json_schema", "schema": value}
    raise BadRequest('format must be "json" or a JSON schema (an object)')


def build_generate(
    rid: int, model: str, body: CommonBody, most_tokens: int, **prompt: Any
) -> Generate:
    """The native request for ``body``'s model, options and keep-alive, with the prompt
    fields given; validated by the native constraints (a bad value: 400 naming it).
    ``num_predict`` absent or under 1 is Ollama's "until the context is full": the
    daemon's ``most_tokens`` (max_tokens_limit), which the worker caps at the context."""
    o = body.options or Options()
    fields: dict[str, Any] = {"id": rid, "model": model, **prompt, "max_tokens": most_tokens}
    for name, value in (
        ("temperature", o.temperature),
        ("top_p", o.top_p),
        ("top_k", o.top_k),
        ("min_p", o.min_p),
    ):
        if value is not None:
            fields[name] = value
    if o.num_predict is not None and o.num_predict > 0:
        fields["max_tokens"] = o.num_predict
    if o.stop:
        fields["stop"] = [o.stop] if isinstance(o.stop, str) else [s for s in o.stop if s]
    if o.seed is not None and o.seed >= 0:
        fields["seed"] = o.seed
    if o.repeat_penalty is not None and o.repeat_penalty > 0 and o.repeat_penalty != 1.0:
        fields["repetition_penalty"] = o.repeat_penalty
    if o.repeat_last_n is not None and o.repeat_last_n > 0:
        fields["repetition_context_size"] = o.repeat_last_n
    keep = parse_keep_alive(body.keep_alive)
    if keep is not None:
        fields["keep_alive"] = keep
    fmt = _format(body.format)
    if fmt is not None:
        fields["format"] = fmt
    if body.think is not None and "messages" in prompt:
        # A level ("high", as gpt-oss takes) is thinking on, at that effort.
        fields["think"] = body.think if isinstance(body.think, bool) else True
        if isinstance(body.think, str):
            fields["reasoning_effort"] = body.think
    if body.logprobs:
        fields.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    if isinstance(body, ChatBody) and body.tools:
        fields["tools"] = body.tools
    if o.tool_choice is not None:
        fields["tool_choice"] = o.tool_choice
    if o.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = o.parallel_tool_calls
    if o.speculative is not None:
        fields["speculative"] = o.speculative
    try:
        return msgspec.convert(fields, type=Generate)
    except msgspec.ValidationError as exc:
        text = str(exc)
        for native, ours in _OPTION_NAMES.items():
            text = text.replace(f"`$.{native}`", f"`$.{ours}`")
        raise BadRequest(text) from None


def chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Ollama's chat messages as native ones, to be validated with the rest of the
    ``Generate`` (a bad one: 400 naming ``$.messages[i]...``): an assistant turn's calls
    (an id made for one without), a tool turn's ``tool_name`` as ``name``."""
    out = []
    for i, m in enumerate(messages):
        if m.images:
            raise BadRequest(f"messages[{i}].images: images are not supported by mlxd")
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            turn["tool_calls"] = [
                {"id": c.id or new_call_id(), "name": c.function.name,
                 "arguments": c.function.arguments}
                for c in m.tool_calls
            ]  # fmt: skip
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        if m.tool_name is not None:
            turn["name"] = m.tool_name
        out.append(turn)
    return out
