"""Ollama's model endpoints (``/api/tags``, ``/api/ps``, ``/api/show``) and what the
Ollama API's handlers share: its error shape, times, model names, body decoding.

Threading: event loop only; never calls MLX (model facts are read from disk on a
thread, ``daemon/ollama_info.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from aiohttp import web

from mlxd.protocol import Error, ListModels, ModelInfo, errors

from .http_server import HttpCall, server_of, status_for
from .ollama_info import describe, rfc3339

FOREVER = "9999-12-31T23:59:59Z"
"""``expires_at`` of a model kept resident forever (keep-alive -1)."""


class ShowBody(msgspec.Struct):
    model: str = ""
    name: str = ""
    """The legacy name of ``model``."""


class BadRequest(Exception):
    """A request mlxd refuses before it reaches the worker: 400 with this message."""


def error_response(message: str, status: int) -> web.Response:
    # Retry-After on a 429 or 503 is added by http_server's middleware, for every API.
    return web.Response(
        body=msgspec.json.encode({"error": message}),
        status=status,
        content_type="application/json",
    )


def native_error(err: Error) -> web.Response:
    return error_response(err.message, status_for(err.code))


def json_response(obj: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), content_type="application/json")


def now() -> str:
    return rfc3339(time.time())


def model_name(name: str) -> str:
    """Ollama names carry a tag; mlxd's have none, so ``:latest`` is dropped."""
    return name.removesuffix(":latest")


def decode(request_body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(request_body or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None


async def find_model(request: web.Request, name: str) -> ModelInfo | Error:
    call = HttpCall(server_of(request), "ollama")
    reply = await call.call(ListModels(id=call.next_id()))
    if isinstance(reply, Error):
        return reply
    for m in reply.models or []:
        if m.name == name:
            return m
    return Error(code=errors.UNKNOWN_MODEL, message=f"model {name!r} not found")


async def list_models(request: web.Request) -> list[ModelInfo] | Error:
    call = HttpCall(server_of(request), "ollama")
    reply = await call.call(ListModels(id=call.next_id()))
    return reply if isinstance(reply, Error) else list(reply.models or [])


async def tags(request: web.Request) -> web.Response:
    models = await list_models(request)
    if isinstance(models, Error):
        return native_error(models)
    out = []
    for m in models:
        f = await asyncio.to_thread(describe, m.path)
        out.append(
            {
                "name": m.name,
                "model": m.name,
                "modified_at": f.modified_at,
                "size": f.size,
                "digest": f.digest,
                "details": f.details(),
            }
        )
    return json_response({"models": out})


async def ps(request: web.Request) -> web.Response:
    models = await list_models(request)
    if isinstance(models, Error):
        return native_error(models)
    out = []
    for m in models:
        if not m.resident:
            continue
        f = await asyncio.to_thread(describe, m.path)
        keep = m.keep_alive_s
        if keep is None or keep < 0 or m.pinned:
            expires = FOREVER
        else:
            busy = m.active_sequences > 0 or m.last_used is None
            expires = rfc3339((time.time() if busy else m.last_used or 0.0) + keep)
        out.append(
            {
                "name": m.name,
                "model": m.name,
                "size": m.bytes,
                "size_vram": m.bytes,  # unified memory: all of it is the GPU's
                "digest": f.digest,
                "details": f.details(),
                "expires_at": expires,
                "context_length": f.context_length,
            }
        )
    return json_response({"models": out})


async def show(request: web.Request) -> web.Response:
    try:
        body = decode(await request.read(), ShowBody)
    except BadRequest as exc:
        return error_response(str(exc), 400)
    name = model_name(body.model or body.name)
    if not name:
        return error_response("model is required", 400)
    known = await find_model(request, name)
    if isinstance(known, Error):
        return native_error(known)
    f = await asyncio.to_thread(describe, known.path)
    has = {"tools": f.tools, "insert": f.fim, "thinking": f.thinking}
    capabilities = ["completion"] + [name for name, yes in has.items() if yes]
    return json_response(
        {
            "modelfile": f"# mlxd serves {known.name} from {known.path}\nFROM {known.path}\n",
            "parameters": "",
            "template": f.template,
            "details": f.details(),
            "model_info": f.model_info,
            "capabilities": capabilities,
            "modified_at": f.modified_at,
        }
    )
