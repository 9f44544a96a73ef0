"""The OpenAI API's request and response bodies, as msgspec Structs, and their translation
into a native ``Generate``: what is served, what is refused (``Refused``, a 400 naming the
parameter) and what is ignored (any field not declared here; see docs/HTTP.md).

Threading: pure data and pure functions; safe from any thread.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from mlxd.protocol import (
    MAX_STOPS,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    Format,
    Generate,
    JsonFormat,
    JsonSchemaFormat,
    Usage,
)
from mlxd.protocol.messages import (
    KeepAlive,
    LogitBias,
    Priority,
    Probability,
    Temperature,
)
from mlxd.protocol.options import ReasoningEffort, SpeculativeMode

from .openai_logprobs import ChatLogprobs, CompletionLogprobs
from .openai_tools import (
    CallOut,
    DeltaCall,
    MessageToolCall,
    Refused,
    ToolChoiceObject,
    ToolSpec,
    history_calls,
    tool_fields,
)

StopString = Annotated[str, Meta(min_length=1, max_length=1024)]
TopLogprobs = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]


# --------------------------------------------------------------------------- requests


class StreamOptions(Struct):
    include_usage: bool = False


class _Body(Struct, kw_only=True):
    """The fields both endpoints share (OpenAI's names, then mlxd's own extras)."""

    model: Annotated[str, Meta(max_length=512)] | None = None
    """Absent or empty: the daemon's default model."""
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    stop: StopString | Annotated[list[StopString], Meta(max_length=MAX_STOPS)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    logit_bias: dict[str, LogitBias] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None  # accepted, unused
    # mlxd's own sampling and scheduling fields (as vLLM and mlx_lm.server accept extras)
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    priority: Priority | None = None
    keep_alive: KeepAlive | None = None
    cache: bool | None = None
    speculative: SpeculativeMode | None = None


class CompletionBody(_Body, kw_only=True):
    prompt: str | list[Any]
    suffix: str | None = None
    echo: bool = False
    best_of: Annotated[int, Meta(ge=1)] | None = None
    logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class Message(Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a tool turn: the function's (templates that want it)
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    audio: Any = None


class JsonSchemaSpec(Struct, kw_only=True):
    name: Annotated[str, Meta(max_length=256)] = ""  # accepted, unused
    description: str | None = None  # accepted, unused
    schema: dict[str, Any] | None = None
    strict: bool | None = None  # the schema is always enforced in full (docs/HTTP.md)


class ResponseFormat(Struct, kw_only=True):
    type: str
    json_schema: JsonSchemaSpec | None = None


class ChatBody(_Body, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: str | ToolChoiceObject | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    audio: Any = None
    modalities: list[str] | None = None
    reasoning_effort: ReasoningEffort | None = None


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(Struct):
    cached_tokens: int


class OpenAIUsage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: OpenAIUsage | None = None


class AssistantMessage(Struct, omit_defaults=True):
    role: str
    content: str | None
    """None (null) when the reply is only tool calls, as OpenAI's."""
    reasoning_content: str | None = None
    """A thinking model's reasoning (left off for a model without it)."""
    tool_calls: list[CallOut] | None = None


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage
    object: str = "chat.completion"


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaCall] | None = None


class ChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: OpenAIUsage | None = None


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(Struct):
    error: ErrorDetail


def usage_of(usage: Usage | None) -> OpenAIUsage:
    p, c, cached = (
        (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) if usage else (0, 0, 0)
    )
    return OpenAIUsage(p, c, p + c, PromptTokensDetails(cached))


# --------------------------------------------------------------------------- translation


def _common(body: _Body, max_tokens: int | None) -> dict[str, Any]:
    if body.n is not None and body.n > 1:
        raise Refused("n", "n > 1 is not supported: ask once per completion")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise Refused(
                name, f"{name} is not supported (mlxd has repetition_penalty, multiplicative)"
            )
    fields: dict[str, Any] = {}
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    for name in (
        "model", "temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty",
        "priority", "keep_alive", "cache", "speculative",
    ):  # fmt: skip
        value = getattr(body, name)
        if value is not None and value != "":
            fields[name] = value
    if body.stop is not None:
        fields["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if body.logit_bias:
        try:
            fields["logit_bias"] = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise Refused("logit_bias", "logit_bias keys must be token ids") from None
        if any(k < 0 for k in fields["logit_bias"]):
            raise Refused("logit_bias", "logit_bias keys must be token ids")
    return fields


def _token_ids(items: list[Any]) -> list[int] | None:
    if items and all(type(t) is int and t >= 0 for t in items):
        return items
    return None


def completion_request(rid: int, body: CompletionBody) -> Generate:
    if body.echo:
        raise Refused("echo", "echo is not supported")
    if body.best_of is not None and body.best_of > 1:
        raise Refused("best_of", "best_of > 1 is not supported")
    fields = _common(body, body.max_tokens)
    if body.logprobs is not None:
        fields.update(logprobs=True, top_logprobs=body.logprobs)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # one prompt in a batch of one
        if isinstance(prompt, list):
            tokens = _token_ids(prompt)
            if tokens is None:
                raise Refused(
                    "prompt", "prompt must be a string or token ids (one prompt per request)"
                )
            fields["tokens"] = tokens
    if isinstance(prompt, str):
        fields["prompt"] = prompt
    if body.suffix is not None:
        if "prompt" not in fields:
            raise Refused("suffix", "suffix goes with a string prompt")
        fields["suffix"] = body.suffix
    return Generate(id=rid, format=_format(body.response_format), **fields)


def _format(response_format: ResponseFormat | None) -> Format | None:
    """OpenAI's ``response_format`` as the native ``format`` (None for ``text``)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JsonFormat()
    if response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None or spec.schema is None:
            raise Refused("response_format.json_schema.schema", "json_schema needs a schema")
        return JsonSchemaFormat(schema=spec.schema)
    raise Refused(
        "response_format.type",
        f"response_format type {response_format.type!r} is not supported "
        "(text, json_object or json_schema)",
    )


_ROLES = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant",
    "tool": "tool",
}  # fmt: skip


def _content(i: int, message: Message) -> str:
    if message.audio is not None:
        raise Refused(f"messages[{i}].audio", "audio is not supported")
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise Refused(
                f"messages[{i}].content[{j}].type",
                f"content parts of type {part.type!r} are not supported (text only)",
            )
        texts.append(part.text)
    return "".join(texts)


def chat_request(rid: int, body: ChatBody) -> Generate:
    if body.top_logprobs is not None and not body.logprobs:
        raise Refused("top_logprobs", "top_logprobs needs logprobs: true")
    if body.functions:
        raise Refused("functions", "functions (deprecated by OpenAI) are not supported: use tools")
    if body.function_call not in (None, "none"):
        raise Refused(
            "function_call", "function_call (deprecated) is not supported: use tool_choice"
        )
    if body.audio is not None or (body.modalities and body.modalities != ["text"]):
        raise Refused("audio" if body.audio is not None else "modalities", "audio is not supported")
    messages = []
    for i, m in enumerate(body.messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise Refused(f"messages[{i}].role", f"role {m.role!r} is not supported")
        calls = history_calls(i, m.tool_calls) if m.tool_calls else None
        name = m.name if role == "tool" else None
        turn = ChatMessage(
            role=role,
            content=_content(i, m),
            tool_calls=calls,
            tool_call_id=m.tool_call_id,
            name=name,
        )
        messages.append(turn)
    max_tokens = body.max_completion_tokens or body.max_tokens
    fields = _common(body, max_tokens)
    fields.update(tool_fields(body.tools, body.tool_choice))
    if body.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = body.parallel_tool_calls
    if body.reasoning_effort is not None:
        fields["reasoning_effort"] = body.reasoning_effort
    if body.logprobs:
        fields.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    return Generate(id=rid, messages=messages, format=_format(body.response_format), **fields)


def param_of(field: str | None) -> str | None:
    """A native field path (``$.tokens``) as the OpenAI parameter it came from."""
    if not field:
        return None
    name = field.removeprefix("$").removeprefix(".")
    if name == "format" or name.startswith("format."):
        schema = name == "format.schema"
        return "response_format.json_schema.schema" if schema else "response_format"
    if name.startswith("tool_choice"):
        return "tool_choice"
    return {"tokens": "prompt", "suffix": "suffix"}.get(name, name) or None


def decode_error_param(exc: msgspec.ValidationError) -> str | None:
    """The parameter a msgspec validation error names (``... - at `$.top_p` ``)."""
    text = str(exc)
    at = text.rfind("at `$")
    param = text[at + 5 : text.index("`", at + 5)].removeprefix(".") if at >= 0 else ""
    if text.startswith("Object missing required field `"):
        missing = text.split("`")[1]
        param = f"{param}.{missing}" if param else missing
    return param or None
