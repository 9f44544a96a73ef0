"""The OpenAI-compatible HTTP API: an adapter from OpenAI's request and response shapes
onto the native requests and events (see daemon/http_server.py). Bodies and their
translation live in daemon/openai_schema.py.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, streamed as
server-sent events or not. A streamed response's status and headers wait for the first
token, so an error before it (overloaded, unknown model, prompt too long) still gets its
own status; one after it is sent as a last ``data: {"error": ...}`` event.

Threading: event loop only; never calls MLX.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from mlxd.protocol import Chunk, Done, Error, Generate, ListModels, TokenLogprob, ToolCall, errors

from . import openai_schema as s
from .http_server import OPENAI_TYPES, HttpCall, server_of, status_for
from .openai_logprobs import LogprobShaper
from .openai_tools import call_fragments, calls_out

JSON = "application/json"


class _Model(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "mlxd"


class _ModelList(msgspec.Struct):
    data: list[_Model]
    object: str = "list"


_CODES = {errors.UNKNOWN_MODEL: "model_not_found"}


def _error_body(status: int, message: str, param: str | None, code: str | None) -> bytes:
    kind = OPENAI_TYPES.get(status, "server_error")
    return msgspec.json.encode(s.ErrorBody(s.ErrorDetail(message, kind, param, code)))


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> web.Response:
    # Retry-After on a 429 or 503 is added by http_server's middleware, for every API.
    body = _error_body(status, message, param, code)
    return web.Response(status=status, body=body, content_type=JSON)


def _native_error(err: Error) -> web.Response:
    code = _CODES.get(err.code, err.code)
    return error_response(status_for(err.code), err.message, s.param_of(err.field), code)


def _cancelled() -> web.Response:
    return error_response(503, "the request was cancelled", None, "cancelled")


async def models(request: web.Request) -> web.Response:
    call = HttpCall(server_of(request), "openai")
    reply = await call.call(ListModels(id=call.next_id()))
    if isinstance(reply, Error):
        return _native_error(reply)
    assert isinstance(reply, Done)
    now = int(time.time())
    data = [_Model(id=m.name, created=now) for m in reply.models or []]
    return web.Response(body=msgspec.json.encode(_ModelList(data=data)), content_type=JSON)


async def _decode(request: web.Request, kind: type[Any]) -> Any:
    """The body as ``kind``, or a 400 ``web.Response`` naming what is wrong."""
    raw = await request.read()
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        return error_response(400, str(exc), s.decode_error_param(exc), "invalid_request")
    except msgspec.DecodeError as exc:
        return error_response(400, f"the body is not valid JSON: {exc}", None, "invalid_json")


def _model_name(request: web.Request, gen: Generate) -> str:
    return gen.model or server_of(request).config.default_model_name() or ""


class _Shape:
    """How one endpoint words its responses: one object, or chunks of a stream."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self._logprobs = LogprobShaper()

    def _shaped(self, entries: list[TokenLogprob] | None) -> Any:
        if entries is None:
            return None
        return self._logprobs.chat(entries) if self.chat else self._logprobs.completion(entries)

    def whole(
        self,
        text: str,
        done: Done,
        reasoning: str = "",
        lps: list[TokenLogprob] | None = None,
        calls: list[ToolCall] | None = None,
    ) -> msgspec.Struct:
        usage = s.usage_of(done.usage)
        if self.chat:
            content = None if calls and not text else text  # null beside calls, as OpenAI's
            message = s.AssistantMessage("assistant", content, reasoning or None)
            message.tool_calls = calls_out(calls or [])
            choice = s.ChatChoice(0, message, done.finish_reason, self._shaped(lps))
            return s.ChatCompletion(self.id, self.created, self.model, [choice], usage)
        c = s.CompletionChoice(0, text, done.finish_reason, self._shaped(lps))
        return s.Completion(self.id, self.created, self.model, [c], usage=usage)

    def chunk(
        self,
        text: str | None,
        finish: str | None = None,
        role: bool = False,
        reasoning: str | None = None,
        lps: list[TokenLogprob] | None = None,
        calls: list[s.DeltaCall] | None = None,
    ) -> msgspec.Struct:
        if self.chat:
            role_ = "assistant" if role else None
            delta = s.Delta(role=role_, content=text, reasoning_content=reasoning, tool_calls=calls)
            choice = s.ChunkChoice(0, delta, finish, self._shaped(lps))
            return s.ChatChunk(self.id, self.created, self.model, [choice])
        c = s.CompletionChoice(0, text or "", finish, self._shaped(lps))
        return s.Completion(self.id, self.created, self.model, [c])

    def usage_chunk(self, done: Done) -> msgspec.Struct:
        usage = s.usage_of(done.usage)
        if self.chat:
            return s.ChatChunk(self.id, self.created, self.model, [], usage=usage)
        return s.Completion(self.id, self.created, self.model, [], usage=usage)


async def _whole(call: HttpCall, gen: Generate, shape: _Shape) -> web.Response:
    parts: list[str] = []
    thoughts: list[str] = []
    lps: list[TokenLogprob] | None = [] if gen.logprobs else None
    calls: list[ToolCall] = []
    async for message in call.events(gen):
        if isinstance(message, Chunk):
            parts.append(message.text)
            thoughts.append(message.reasoning)
            calls += message.tool_calls or ()
            if lps is not None and message.logprobs:
                lps += message.logprobs
        elif isinstance(message, Error):
            return _native_error(message)
        elif isinstance(message, Done):
            if message.finish_reason == "cancelled":
                return _cancelled()
            whole = shape.whole("".join(parts), message, "".join(thoughts), lps, calls)
            body = msgspec.json.encode(whole)
            return web.Response(body=body, content_type=JSON)
    return error_response(500, "the request ended without a reply", None, "internal_error")


async def _stream(
    request: web.Request, call: HttpCall, gen: Generate, shape: _Shape, include_usage: bool
) -> web.StreamResponse:
    response: web.StreamResponse | None = None

    async def send(event: msgspec.Struct | bytes) -> None:
        nonlocal response
        if response is None:
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            if shape.chat:  # the first delta carries the role
                await send(shape.chunk("", role=True))
        data = event if isinstance(event, bytes) else msgspec.json.encode(event)
        await response.write(b"data: " + data + b"\n\n")

    sent_calls = 0
    async for message in call.events(gen):
        if isinstance(message, Chunk):
            if message.reasoning and shape.chat:
                await send(shape.chunk(None, reasoning=message.reasoning))
            if message.logprobs:  # tokens whose text is held back still have theirs
                await send(shape.chunk(message.text, lps=message.logprobs))
            elif message.text:
                await send(shape.chunk(message.text))
            for tool_call in message.tool_calls or ():
                for fragment in call_fragments(tool_call, sent_calls):
                    await send(shape.chunk(None, calls=[fragment]))
                sent_calls += 1
        elif isinstance(message, Error):
            if response is None:
                return _native_error(message)
            code = _CODES.get(message.code, message.code)
            status = status_for(message.code)
            await send(_error_body(status, message.message, s.param_of(message.field), code))
            break
        elif isinstance(message, Done):
            if message.finish_reason == "cancelled":
                if response is None:
                    return _cancelled()
                await send(_error_body(503, "the request was cancelled", None, "cancelled"))
                break
            finish = shape.chunk(None if shape.chat else "", message.finish_reason)
            await send(finish)
            if include_usage:
                await send(shape.usage_chunk(message))
            await send(b"[DONE]")
    assert response is not None
    await response.write_eof()
    return response


async def _serve(
    request: web.Request, kind: type[Any], build: Callable[[int, Any], Generate], chat: bool
) -> web.StreamResponse:
    body = await _decode(request, kind)
    if isinstance(body, web.Response):
        return body
    call = HttpCall(server_of(request), "openai")
    try:
        gen = build(call.next_id(), body)
    except s.Refused as exc:
        return error_response(400, exc.message, exc.param, "unsupported_parameter")
    shape = _Shape(chat, _model_name(request, gen))
    if body.stream:
        include = body.stream_options is not None and body.stream_options.include_usage
        return await _stream(request, call, gen, shape, include)
    return await _whole(call, gen, shape)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, s.CompletionBody, s.completion_request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, s.ChatBody, s.chat_request, chat=True)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
