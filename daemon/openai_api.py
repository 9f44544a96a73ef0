"""The OpenAI-compatible HTTP API: an adapter from OpenAI's request and response shapes
onto the native requests and events (see daemon/http_server.py).

Threading: event loop only; never calls MLX.
"""

from __future__ import annotations

import time

import msgspec
from aiohttp import web

from mlxd.protocol import Done, Error, ListModels

from .http_server import HttpCall, server_of, status_for


class _Model(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "mlxd"


class _ModelList(msgspec.Struct):
    data: list[_Model]
    object: str = "list"


def _error(err: Error) -> web.Response:
    body = {
        "error": {"message": err.message, "type": err.code, "param": err.field, "code": err.code}
    }
    return web.json_response(body, status=status_for(err.code))


async def models(request: web.Request) -> web.Response:
    call = HttpCall(server_of(request), "openai")
    reply = await call.call(ListModels(id=call.next_id()))
    if isinstance(reply, Error):
        return _error(reply)
    assert isinstance(reply, Done)
    now = int(time.time())
    data = [_Model(id=m.name, created=now) for m in reply.models or []]
    return web.Response(
        body=msgspec.json.encode(_ModelList(data=data)), content_type="application/json"
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", models)
