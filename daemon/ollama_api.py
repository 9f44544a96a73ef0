"""The Ollama-compatible HTTP API: its handlers, from Ollama's requests (translated into
native ones by daemon/ollama_requests.py) to the native events and back in Ollama's
shapes (see daemon/http_server.py; docs/HTTP.md says what is served, refused and ignored).

Bodies are msgspec ``Struct``\\s; unknown fields and unknown ``options`` are ignored, as
Ollama ignores them. A chat's tool calls (native ``Chunk.tool_calls``) are
``message.tool_calls``, arguments as an object, each in the object of the chunk that
completed it; ``done_reason`` stays ``stop`` after calls, as Ollama says. Errors are
Ollama's ``{"error": "..."}`` with the status its clients expect (``status_for``).
``/api/generate`` and ``/api/chat`` stream NDJSON unless ``stream`` is false; the
response starts with the first token, so an error before it (unknown model, bad field)
still gets its status.

Threading: event loop only; never calls MLX (model facts are read on a thread,
``daemon/ollama_info.py``).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from mlxd.protocol import (
    ChatMessage,
    Chunk,
    Done,
    Error,
    Load,
    Progress,
    TokenLogprob,
    ToolCall,
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
from .ollama_requests import (
    ChatBody,
    CommonBody,
    GenerateBody,
    build_generate,
    chat_messages,
    parse_keep_alive,
)
from .openai_logprobs import token_string

OLLAMA_VERSION = "0.6.0"
"""The Ollama API version reported to clients (they check it for features)."""

NOT_SERVED = ("pull", "push", "create", "copy", "delete", "embed", "embeddings", "blobs")
"""Ollama endpoints mlxd knows and does not serve: 501 (any other /api path: 404)."""

SERVED = ("version", "tags", "ps", "show", "generate", "chat")


def _stats(done: Done, load_s: float) -> dict[str, Any]:
    """Ollama's final-message fields, durations in nanoseconds."""
    usage, t = done.usage, done.timings
    # Ollama says stop when the model called tools (only its OpenAI API says tool_calls).
    reason = "stop" if done.finish_reason in (None, "tool_calls") else done.finish_reason
    fields: dict[str, Any] = {"done": True, "done_reason": reason}
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
    request: web.Request, body: CommonBody, model: str, prompts: list[dict[str, Any]], chat: bool
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
    calls: list[dict[str, Any]] = []
    load_started: float | None = None
    load_s = 0.0

    def piece(
        text: str, thinking: str = "", tool_calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        head: dict[str, Any] = {"model": model, "created_at": now()}
        if chat:
            head["message"] = {"role": "assistant", "content": text}
            if thinking:
                head["message"]["thinking"] = thinking
            if tool_calls:
                head["message"]["tool_calls"] = tool_calls
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
                made = [_tool_call(c) for c in message.tool_calls or ()]
                if not (message.text or message.reasoning or message.logprobs or made):
                    continue
                lps = [_logprob(e) for e in message.logprobs or ()]
                if not body.stream:
                    texts.append(message.text)
                    thoughts.append(message.reasoning)
                    logprobs += lps
                    calls += made
                    continue
                if stream is None:
                    stream = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                    await stream.prepare(request)
                extra = {"logprobs": lps} if lps else {}
                out = piece(message.text, message.reasoning, made)
                await line({**out, **extra, "done": False})
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
                whole = ("", "", []) if body.stream else ("".join(texts), "".join(thoughts), calls)
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


def _tool_call(call: ToolCall) -> dict[str, Any]:
    """Ollama's shape of a call, arguments an object; the native id beside it, an extra
    field its SDK ignores (a tool turn may answer by it)."""
    return {"id": call.id, "function": {"name": call.name, "arguments": call.arguments}}


def _logprob(entry: TokenLogprob) -> dict[str, Any]:
    """Ollama's shape of a token's logprob (its ``bytes`` as OpenAI's, a list of ints)."""
    top = [
        {"token": token_string(a.bytes), "logprob": a.logprob, "bytes": list(a.bytes)}
        for a in entry.top_logprobs
    ]
    return {"token": token_string(entry.bytes), "logprob": entry.logprob,
            "bytes": list(entry.bytes), "top_logprobs": top}  # fmt: skip


async def _load_or_unload(
    request: web.Request, body: CommonBody, model: str, chat: bool
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
        messages = chat_messages(body.messages)
        model = model_name(body.model)
        if not body.messages:
            return await _load_or_unload(request, body, model, chat=True)
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
