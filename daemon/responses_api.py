"""OpenAI's Responses API (``POST /v1/responses``, what Codex CLI speaks): an adapter from
its request, response and SSE event shapes onto a native chat ``Generate`` (see
daemon/http_server.py). Text only: one ``message`` output item with one ``output_text``
part. Nothing is stored: ``store`` is ignored, ``previous_response_id`` refused.

Threading: event loop only; never calls MLX.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta, Struct

from mlxd.protocol import ChatMessage, Chunk, Done, Error, Generate

from .http_server import HttpCall, next_reply, server_of, status_for

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text")


class _Part(Struct, kw_only=True):
    type: str
    text: str = ""


class _Item(Struct, kw_only=True):
    type: str = "message"
    role: str = "user"
    content: str | list[_Part] = ""


class _Format(Struct, kw_only=True):
    type: str = "text"


class _Text(Struct, kw_only=True):
    format: _Format | None = None


class ResponsesRequest(Struct, kw_only=True):
    """The fields mlxd reads or refuses; any other field (``store``, ``metadata``, ``user``,
    ``reasoning``, ``include``, ``truncation``, ``parallel_tool_calls``, ``service_tier``,
    ``prompt_cache_key``, ``safety_identifier``) is ignored."""

    input: str | list[_Item]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    stream: bool = False
    # mlxd's own sampling extras, as on /v1/chat/completions.
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    # Refused when set (see _refusal).
    tools: list[Any] | None = None
    tool_choice: Any = None
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    top_logprobs: int | None = None
    text: _Text | None = None


class _Bad(Exception):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def _error(
    status: int, message: str, kind: str, param: str | None, code: str | None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)  # Retry-After on 503: the middleware


def _native_error(err: Error) -> web.Response:
    status = status_for(err.code)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _error(status, err.message, kind, err.field, err.code)


_AT = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def param_of(message: str) -> str | None:
    """The parameter a msgspec validation error names, as a dotted path (`a.b[0].c`)."""
    missing, at = _MISSING.search(message), _AT.search(message)
    where = at.group(1) if at else ""
    if missing:
        return f"{where}.{missing.group(1)}" if where else missing.group(1)
    return where or None


def _refusal(req: ResponsesRequest) -> _Bad | None:
    if req.tools and req.tool_choice != "none":
        return _Bad("tools are not supported yet (text only)", "tools")
    for name in ("previous_response_id", "conversation", "prompt"):
        if getattr(req, name) is not None:
            return _Bad(f"{name} is not supported: mlxd stores no responses", name)
    if req.background:
        return _Bad("background responses are not supported", "background")
    if req.top_logprobs:
        return _Bad("top_logprobs is not supported", "top_logprobs")
    if req.text and req.text.format and req.text.format.type != "text":
        return _Bad(f"text.format {req.text.format.type!r} is not supported", "text.format")
    return None


def _messages(req: ResponsesRequest) -> list[ChatMessage]:
    out = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    if isinstance(req.input, str):
        return [*out, ChatMessage(role="user", content=req.input)]
    for i, item in enumerate(req.input):
        if item.type != "message":
            raise _Bad(f"input items of type {item.type!r} are not supported", f"input[{i}]")
        role = _ROLES.get(item.role)
        if role is None:
            raise _Bad(f"unknown role {item.role!r}", f"input[{i}].role")
        if isinstance(item.content, str):
            content = item.content
        else:
            texts = []
            for j, part in enumerate(item.content):
                if part.type not in _TEXT_PARTS:
                    where = f"input[{i}].content[{j}]"
                    raise _Bad(f"content of type {part.type!r} is not supported (text only)", where)
                texts.append(part.text)
            content = "".join(texts)
        out.append(ChatMessage(role=role, content=content))
    return out


def _generate(req: ResponsesRequest, rid: int) -> Generate:
    fields: dict[str, Any] = {
        k: v
        for k, v in (
            ("max_tokens", req.max_output_tokens),
            ("temperature", req.temperature),
            ("top_p", req.top_p),
            ("top_k", req.top_k),
            ("min_p", req.min_p),
            ("seed", req.seed),
        )
        if v is not None
    }
    return Generate(id=rid, model=req.model, messages=_messages(req), **fields)


class _Builder:
    """The response object and its one message item, as they stand."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req = req
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.text = ""
        self.seq = -1

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

    def item(self, status: str, parts: bool = True) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [self.part()] if parts else [],
        }

    def response(self, done: Done | None = None, error: Error | None = None) -> dict[str, Any]:
        status, incomplete, usage, output = "in_progress", None, None, []
        if error is not None:
            status = "failed"
        elif done is not None:
            status = "completed" if done.finish_reason == "stop" else "incomplete"
            if done.finish_reason == "length":
                incomplete = {"reason": "max_output_tokens"}
            output = [self.item("completed" if status == "completed" else "incomplete")]
            u = done.usage
            if u is not None:
                usage = {
                    "input_tokens": u.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": u.cached_tokens},
                    "output_tokens": u.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": u.prompt_tokens + u.completion_tokens,
                }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": {"code": error.code, "message": error.message} if error else None,
            "incomplete_details": incomplete,
            "instructions": self.req.instructions,
            "max_output_tokens": self.req.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": False,
            "temperature": self.req.temperature,
            "tool_choice": "none",
            "tools": [],
            "top_p": self.req.top_p,
            "store": False,
            "usage": usage,
        }

    def event(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        data = msgspec.json.encode({"type": kind, "sequence_number": self.seq, **fields})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


async def create(request: web.Request) -> web.StreamResponse:
    try:
        req = msgspec.json.decode(await request.read(), type=ResponsesRequest)
    except web.HTTPRequestEntityTooLarge as e:
        return _error(413, e.text or "request body too large", "invalid_request_error", None, None)
    except msgspec.ValidationError as e:
        return _error(400, str(e), "invalid_request_error", param_of(str(e)), "invalid_value")
    except msgspec.DecodeError as e:
        return _error(400, f"malformed JSON: {e}", "invalid_request_error", None, "invalid_json")
    try:
        refused = _refusal(req)
        if refused is not None:
            raise refused
        server = server_of(request)
        call = HttpCall(server, "openai")
        native = _generate(req, call.next_id())
    except _Bad as e:
        return _error(400, e.message, "invalid_request_error", e.param, "unsupported_parameter")
    model = req.model or server.config.default_model_name() or ""
    build = _Builder(req, model)
    events = call.events(native)
    try:
        first = await next_reply(events)
        if isinstance(first, Error):
            return _native_error(first)
        if not req.stream:
            final = first
            while isinstance(final, Chunk):
                build.text += final.text
                final = await next_reply(events)
            if isinstance(final, Error):
                return _native_error(final)
            body = msgspec.json.encode(build.response(final))
            return web.Response(body=body, content_type="application/json")
        return await _stream(request, build, first, events)
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def _stream(
    request: web.Request, build: _Builder, first: Any, events: AsyncIterator[Any]
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    ids = {"item_id": build.item_id, "output_index": 0, "content_index": 0}
    await resp.write(build.event("response.created", response=build.response()))
    await resp.write(build.event("response.in_progress", response=build.response()))
    item = build.item("in_progress", parts=False)
    await resp.write(build.event("response.output_item.added", output_index=0, item=item))
    part = build.part()
    await resp.write(build.event("response.content_part.added", part=part, **ids))
    message = first
    while isinstance(message, Chunk):
        if message.text:
            build.text += message.text
            delta = build.event(
                "response.output_text.delta", delta=message.text, logprobs=[], **ids
            )
            await resp.write(delta)
        message = await next_reply(events)
    if isinstance(message, Error):
        await resp.write(build.event("response.failed", response=build.response(error=message)))
        await resp.write_eof()
        return resp
    final = build.response(message)
    await resp.write(build.event("response.output_text.done", text=build.text, logprobs=[], **ids))
    await resp.write(build.event("response.content_part.done", part=build.part(), **ids))
    done_item = final["output"][0]
    await resp.write(build.event("response.output_item.done", output_index=0, item=done_item))
    # Always response.completed (the SDK's stream helper and Codex CLI wait for it), even
    # when its response is "incomplete" (cut at max_output_tokens).
    await resp.write(build.event("response.completed", response=final))
    await resp.write_eof()
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create)
