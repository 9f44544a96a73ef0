"""Anthropic's Messages API (``POST /v1/messages``, what Claude Code speaks): an adapter from
its request, message and SSE event shapes onto a native chat ``Generate`` (see
daemon/http_server.py). Text only: one ``text`` content block. ``x-api-key`` and
``anthropic-version`` headers are accepted and not read here.

Threading: event loop only; never calls MLX.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import Meta, Struct

from mlxd.protocol import MAX_STOPS, ChatMessage, Chunk, Done, Error, Generate, errors

from .http_server import (
    HttpCall,
    anthropic_type,
    next_reply,
    retry_after_headers,
    server_of,
    status_for,
)
from .responses_api import param_of


class _Block(Struct, kw_only=True):
    type: str
    text: str = ""


class _Message(Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[_Block]


class MessagesRequest(Struct, kw_only=True):
    """The fields mlxd reads or refuses; others (``metadata``, ``service_tier``,
    ``thinking``, ``output_config.effort``, ``cache_control``) are ignored."""

    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[_Message], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1)]
    system: str | list[_Block] | None = None
    stop_sequences: (
        Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=MAX_STOPS)] | None
    ) = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    stream: bool = False
    tools: list[Any] | None = None
    tool_choice: Any = None
    output_config: dict[str, Any] | None = None


class _Bad(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _error(status: int, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": anthropic_type(status), "message": message}}
    # The middleware gives a 503 its Retry-After; 529 is Anthropic's own overloaded.
    headers = retry_after_headers(errors.OVERLOADED) if status == 529 else None
    return web.json_response(body, status=status, headers=headers)


def _status(err: Error) -> int:
    return 529 if err.code == errors.OVERLOADED else status_for(err.code)


def _native_error(err: Error) -> web.Response:
    where = f"{err.field}: " if err.field else ""
    return _error(_status(err), where + err.message)


def _text(content: str | list[_Block], where: str) -> str:
    if isinstance(content, str):
        return content
    for j, block in enumerate(content):
        if block.type != "text":
            raise _Bad(f"{where}[{j}]: content of type {block.type!r} is not supported (text only)")
    return "".join(block.text for block in content)


def _generate(req: MessagesRequest, rid: int) -> Generate:
    if req.tools and not (
        isinstance(req.tool_choice, dict) and req.tool_choice.get("type") == "none"
    ):
        raise _Bad("tools: tools are not supported yet (text only)")
    if req.output_config and req.output_config.get("format") is not None:
        raise _Bad("output_config.format: structured output is not supported")
    messages = []
    if req.system is not None:
        messages.append(ChatMessage(role="system", content=_text(req.system, "system")))
    for i, m in enumerate(req.messages):
        messages.append(
            ChatMessage(role=m.role, content=_text(m.content, f"messages[{i}].content"))
        )
    fields: dict[str, Any] = {
        k: v
        for k, v in (("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k))
        if v is not None
    }
    return Generate(
        id=rid,
        model=req.model,
        messages=messages,
        max_tokens=req.max_tokens,
        stop=req.stop_sequences or [],
        **fields,
    )


def _stop_reason(done: Done) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if done.stop_sequence is not None else "end_turn"


def _usage(done: Done | None) -> dict[str, int]:
    u = done.usage if done is not None else None
    if u is None:
        return {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0}
    return {
        "input_tokens": u.prompt_tokens,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _message(mid: str, model: str, text: str | None, done: Done | None) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": _stop_reason(done) if done is not None else None,
        "stop_sequence": done.stop_sequence if done is not None else None,
        "usage": _usage(done),
    }


def _event(kind: str, **fields: Any) -> bytes:
    data = msgspec.json.encode({"type": kind, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


async def create(request: web.Request) -> web.StreamResponse:
    try:
        req = msgspec.json.decode(await request.read(), type=MessagesRequest)
    except web.HTTPRequestEntityTooLarge as e:
        return _error(413, e.text or "request body too large")
    except msgspec.ValidationError as e:
        param = param_of(str(e))
        return _error(400, f"{param}: {e}" if param else str(e))
    except msgspec.DecodeError as e:
        return _error(400, f"malformed JSON: {e}")
    call = HttpCall(server_of(request), "anthropic")
    try:
        native = _generate(req, call.next_id())
    except _Bad as e:
        return _error(400, e.message)
    mid = f"msg_{uuid.uuid4().hex}"
    events = call.events(native)
    try:
        message = await next_reply(events)
        if isinstance(message, Error):
            return _native_error(message)
        if not req.stream:
            text = ""
            while isinstance(message, Chunk):
                text += message.text
                message = await next_reply(events)
            if isinstance(message, Error):
                return _native_error(message)
            body = msgspec.json.encode(_message(mid, req.model, text, message))
            return web.Response(body=body, content_type="application/json")
        return await _stream(request, req, mid, message, events)
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def _stream(
    request: web.Request, req: MessagesRequest, mid: str, message: Any, events: AsyncIterator[Any]
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    await resp.write(_event("message_start", message=_message(mid, req.model, None, None)))
    block = {"type": "text", "text": ""}
    await resp.write(_event("content_block_start", index=0, content_block=block))
    await resp.write(_event("ping"))
    while isinstance(message, Chunk):
        if message.text:
            delta = {"type": "text_delta", "text": message.text}
            await resp.write(_event("content_block_delta", index=0, delta=delta))
        message = await next_reply(events)
    if isinstance(message, Error):
        kind = anthropic_type(_status(message))
        await resp.write(_event("error", error={"type": kind, "message": message.message}))
        await resp.write_eof()
        return resp
    await resp.write(_event("content_block_stop", index=0))
    delta = {"stop_reason": _stop_reason(message), "stop_sequence": message.stop_sequence}
    await resp.write(_event("message_delta", delta=delta, usage=_usage(message)))
    await resp.write(_event("message_stop"))
    await resp.write_eof()
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", create)
