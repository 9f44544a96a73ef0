"""The Ollama-compatible HTTP API: an adapter from Ollama's request and response shapes
onto the native requests and events (see daemon/http_server.py; docs/HTTP.md says what
is served, refused and ignored).

Bodies are msgspec ``Struct``\\s; unknown fields and unknown ``options`` are ignored, as
Ollama ignores them. Errors are Ollama's ``{"error": "..."}`` with the status its clients
expect (``status_for``). ``/api/generate`` and ``/api/chat`` stream NDJSON unless
``stream`` is false; the response starts with the first token, so an error before it
(unknown model, bad field) still gets its status.

Threading: event loop only; never calls MLX (model facts are read on a thread,
``daemon/ollama_info.py``).
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec
from aiohttp import web

from mlxd.protocol import (
    ChatMessage,
    ChatRole,
    Chunk,
    Done,
    Error,
    Generate,
    Load,
    Progress,
    TokenLogprob,
    Unload,
)

from .http_server import HttpCall, server_of
from .ollama_models import (
    BadRequest,
    decode,
    error_response,
    find_model,
    json_response,
    model_name,
    native_error,
    now,
    ps,
    show,
    tags,
)
from .openai_logprobs import token_string

OLLAMA_VERSION = "0.6.0"
"""The Ollama API version reported to clients (they check it for features)."""

NOT_SERVED = ("pull", "push", "create", "copy", "delete", "embed", "embeddings", "blobs")
"""Ollama endpoints mlxd knows and does not serve: 501 (any other /api path: 404)."""

SERVED = ("version", "tags", "ps", "show", "generate", "chat")


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


class _Common(msgspec.Struct):
    model: str = ""
    stream: bool = True
    options: Options | None = None
    keep_alive: float | str | None = None
    format: Any = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # only with logprobs


class GenerateBody(_Common):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    template: str | None = None
    images: list[Any] | None = None
    context: list[int] | None = None


class Message(msgspec.Struct):
    role: ChatRole  # as native messages: another role (tool) is a 400 naming it
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class ChatBody(_Common):
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
    rid: int, model: str, body: _Common, most_tokens: int, **prompt: Any
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
    try:
        return msgspec.convert(fields, type=Generate)
    except msgspec.ValidationError as exc:
        text = str(exc)
        for native, ours in _OPTION_NAMES.items():
            text = text.replace(f"`$.{native}`", f"`$.{ours}`")
        raise BadRequest(text) from None


def _stats(done: Done, load_s: float) -> dict[str, Any]:
    """Ollama's final-message fields, durations in nanoseconds."""
    usage, t = done.usage, done.timings
    fields: dict[str, Any] = {"done": True, "done_reason": done.finish_reason or "stop"}
    if t is not None:
        ns = 1_000_000_000
        fields["total_duration"] = int(t.total_s * ns)
        fields["load_duration"] = int(load_s * ns)
        fields["prompt_eval_duration"] = int(max(0.0, t.ttft_s - t.queue_s - load_s) * ns)
        fields["eval_duration"] = int(max(0.0, t.total_s - t.ttft_s) * ns)
    if usage is not None:
        fields["prompt_eval_count"] = usage.prompt_tokens
        fields["eval_count"] = usage.completion_tokens
    return fields


async def _generate(
    request: web.Request, body: _Common, model: str, prompts: list[dict[str, Any]], chat: bool
) -> web.StreamResponse:
    """Run the native generate for the first of ``prompts`` (the next one if the model
    has no chat template), answering in Ollama's shape, streamed or not."""
    call = HttpCall(server_of(request), "ollama")
    most = call.server.config.max_tokens_limit
    reqs = [build_generate(call.next_id(), model, body, most, **p) for p in prompts]
    stream: web.StreamResponse | None = None
    texts: list[str] = []
    thoughts: list[str] = []
    logprobs: list[dict[str, Any]] = []
    load_started: float | None = None
    load_s = 0.0

    def piece(text: str, thinking: str = "") -> dict[str, Any]:
        head: dict[str, Any] = {"model": model, "created_at": now()}
        if chat:
            head["message"] = {"role": "assistant", "content": text}
            if thinking:
                head["message"]["thinking"] = thinking
        else:
            head["response"] = text
            if thinking:
                head["thinking"] = thinking
        return head

    async def line(obj: Any) -> None:
        assert stream is not None
        await stream.write(msgspec.json.encode(obj) + b"\n")

    for i, req in enumerate(reqs):
        async for message in call.events(req):
            if isinstance(message, Progress):
                load_started = load_started or time.perf_counter()
                if message.done_bytes >= message.total_bytes:
                    load_s = time.perf_counter() - load_started
            elif isinstance(message, Chunk):
                if not message.text and not message.reasoning and not message.logprobs:
                    continue
                lps = [_logprob(e) for e in message.logprobs or ()]
                if not body.stream:
                    texts.append(message.text)
                    thoughts.append(message.reasoning)
                    logprobs += lps
                    continue
                if stream is None:
                    stream = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                    await stream.prepare(request)
                extra = {"logprobs": lps} if lps else {}
                await line({**piece(message.text, message.reasoning), **extra, "done": False})
            elif isinstance(message, Error):
                untemplated = (
                    message.field == "$.messages" and "no chat template" in message.message
                )
                if untemplated and i + 1 < len(reqs) and stream is None and not texts:
                    break  # the model has no chat template: the plain prompt instead
                if stream is None:
                    return native_error(message)
                await line({"error": message.message})
                await stream.write_eof()
                return stream
            elif isinstance(message, Done):
                whole = ("", "") if body.stream else ("".join(texts), "".join(thoughts))
                final = {**piece(*whole), **_stats(message, load_s)}
                if req.logprobs and not body.stream:
                    final["logprobs"] = logprobs
                if stream is None and not body.stream:
                    return json_response(final)
                if stream is None:
                    stream = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                    await stream.prepare(request)
                await line(final)
                await stream.write_eof()
                return stream
    raise AssertionError("a generate ended without done or error")


def _logprob(entry: TokenLogprob) -> dict[str, Any]:
    """Ollama's shape of a token's logprob (its ``bytes`` as OpenAI's, a list of ints)."""
    top = [
        {"token": token_string(a.bytes), "logprob": a.logprob, "bytes": list(a.bytes)}
        for a in entry.top_logprobs
    ]
    return {"token": token_string(entry.bytes), "logprob": entry.logprob,
            "bytes": list(entry.bytes), "top_logprobs": top}  # fmt: skip


async def _load_or_unload(
    request: web.Request, body: _Common, model: str, chat: bool
) -> web.Response:
    """An empty prompt (or no messages): load the model, or unload it with keep_alive 0."""
    keep = parse_keep_alive(body.keep_alive)
    known = await find_model(request, model)
    if isinstance(known, Error):
        return native_error(known)
    call = HttpCall(server_of(request), "ollama")
    if keep == 0:
        reply = await call.call(Unload(id=call.next_id(), model=model))
        reason = "unload"
    else:
        reply = await call.call(Load(id=call.next_id(), model=model, keep_alive=keep))
        reason = "load"
    if isinstance(reply, Error):
        return native_error(reply)
    out: dict[str, Any] = {"model": model, "created_at": now()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return json_response({**out, "done": True, "done_reason": reason})


async def generate(request: web.Request) -> web.StreamResponse:
    try:
        body = decode(await request.read(), GenerateBody)
        if not body.model:
            raise BadRequest("model is required")
        if body.images:
            raise BadRequest("images are not supported by mlxd")
        if body.template:
            raise BadRequest("template overrides are not supported by mlxd")
        if body.context:
            raise BadRequest("context (the deprecated token history) is not supported by mlxd")
        model = model_name(body.model)
        if not body.prompt and body.suffix is None:
            return await _load_or_unload(request, body, model, chat=False)
        prompts: list[dict[str, Any]] = []
        if body.suffix is not None:
            prompts.append({"prompt": body.prompt, "suffix": body.suffix})
        elif body.raw:
            prompts.append({"prompt": body.prompt})
        else:
            messages = [ChatMessage(role="user", content=body.prompt)]
            if body.system:
                messages.insert(0, ChatMessage(role="system", content=body.system))
            prompts += [{"messages": messages}, {"prompt": body.prompt}]
        return await _generate(request, body, model, prompts, chat=False)
    except BadRequest as exc:
        return error_response(str(exc), 400)


async def chat(request: web.Request) -> web.StreamResponse:
    try:
        body = decode(await request.read(), ChatBody)
        if not body.model:
            raise BadRequest("model is required")
        if body.tools:
            raise BadRequest("tools are not supported by mlxd yet")
        for i, m in enumerate(body.messages):
            if m.images:
                raise BadRequest(f"messages[{i}].images: images are not supported by mlxd")
            if m.tool_calls:
                raise BadRequest(f"messages[{i}].tool_calls: tools are not supported by mlxd yet")
        model = model_name(body.model)
        if not body.messages:
            return await _load_or_unload(request, body, model, chat=True)
        messages = [ChatMessage(role=m.role, content=m.content) for m in body.messages]
        return await _generate(request, body, model, [{"messages": messages}], chat=True)
    except BadRequest as exc:
        return error_response(str(exc), 400)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION})


async def unknown(request: web.Request) -> web.Response:
    endpoint = request.match_info["tail"].split("/")[0]
    if request.match_info["tail"] in SERVED:
        return error_response(f"{request.method} is not allowed on {request.path}", 405)
    if endpoint in NOT_SERVED:
        return error_response(
            f"/api/{endpoint} is not served by mlxd (models are configured, not pulled; "
            "no embeddings yet)",
            501,
        )
    return error_response(f"unknown endpoint {request.method} {request.path}", 404)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    # Last: any other /api path, any method (a route above with the wrong method: 405).
    app.router.add_route("*", "/api/{tail:.*}", unknown)
