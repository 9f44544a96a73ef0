"""Refusals: the ``error`` that answers a frame the protocol's decoder refused, saying
precisely why (its code, and for ``invalid_request`` the ``field`` as a path), and the
check of a connection's first frame, which must be a valid ``hello``.

A frame that is not a MessagePack map, or holds invalid UTF-8, is ``invalid_message``;
a map of no known type ``unknown_message_type``; a known request with a bad key
``invalid_request``. As a connection's first frame, any map but a ``hello`` is
``handshake_required`` and a hello of another version ``unsupported_version``, whatever
else it holds (docs/PROTOCOL.md, Handshake).

Threading: pure functions, for the event loop thread; error paths only (a second decode).
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from mlxd.protocol import PROTOCOL_VERSION, REQUEST_TYPES, Error, Hello, decode_request, errors
from mlxd.protocol.messages import _REQUESTS

_AT_PATH = re.compile(r"- at `(\$[^`]*)`")
_KEY_IN = re.compile(r"- at `key` in `(\$[^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_TOP_FIELD = re.compile(r"\$\.(\w+)")
_BY_TAG = {t.__struct_config__.tag: t for t in _REQUESTS}


def first_frame(payload: bytes) -> Hello | Error:
    """The connection's ``hello``, or the error that refuses it (the connection closes)."""
    try:
        request = decode_request(payload)
    except Exception as exc:  # any decoding failure is the frame's fault
        raw = _raw_map(payload, exc)
        if isinstance(raw, Error):
            return raw
        if raw.get("type") != "hello":
            return _handshake_required(_valid_id(raw))
        version = raw.get("protocol")
        if type(version) is int and version != PROTOCOL_VERSION:
            return _unsupported(version)
        return _invalid_request(raw, exc, None)
    if not isinstance(request, Hello):
        return _handshake_required(getattr(request, "id", None))
    if request.protocol != PROTOCOL_VERSION:
        return _unsupported(request.protocol)
    return request


def diagnose(payload: bytes, exc: Exception) -> Error:
    """Say precisely why a frame after the handshake was refused."""
    raw = _raw_map(payload, exc)
    if isinstance(raw, Error):
        return raw
    rid = _valid_id(raw)
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in REQUEST_TYPES:
        return Error(
            id=rid,
            code=errors.UNKNOWN_MESSAGE_TYPE,
            message=f"unknown message type {clip(repr(kind))}",
        )
    return _invalid_request(raw, exc, rid)


def clip(text: str, limit: int = 200) -> str:
    # A refusal quotes the client's input for humans, never all of it: it can be megabytes.
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raw_map(payload: bytes, exc: Exception) -> dict[Any, Any] | Error:
    """The payload decoded without a type, if it is a map; else its ``invalid_message``."""
    if isinstance(exc.__cause__, RecursionError):
        return Error(code=errors.INVALID_MESSAGE, message=str(exc))  # decoding again would too
    try:
        obj = msgspec.msgpack.decode(payload)
    except RecursionError:
        return Error(code=errors.INVALID_MESSAGE, message="the message is nested too deeply")
    except Exception as bad:
        reason = clip(str(bad), 120)
        return Error(
            code=errors.INVALID_MESSAGE,
            message=f"the frame is not a valid MessagePack message: {reason}",
        )
    if not isinstance(obj, dict):
        return Error(code=errors.INVALID_MESSAGE, message="a message must be a MessagePack map")
    return obj


def _valid_id(raw: dict[Any, Any]) -> int | None:
    rid = raw.get("id")
    return rid if type(rid) is int and 0 <= rid < 2**53 else None  # a valid id only


def _handshake_required(rid: int | None) -> Error:
    return Error(
        id=rid,
        code=errors.HANDSHAKE_REQUIRED,
        message="the first message on a connection must be hello",
    )


def _unsupported(version: int) -> Error:
    return Error(
        code=errors.UNSUPPORTED_VERSION,
        message=f"this server speaks protocol {PROTOCOL_VERSION}, not {clip(str(version), 40)}",
    )


def _invalid_request(raw: dict[Any, Any], exc: Exception, rid: int | None) -> Error:
    text = str(exc)
    return Error(id=rid, code=errors.INVALID_REQUEST, message=clip(text), field=_field(text, raw))


def _field(text: str, raw: dict[Any, Any]) -> str:
    """The offending key as a path: ``$.top_p``, ``$.stop[0]``, ``$.messages[1].content``,
    or for a map's entry its key: ``$.logit_bias[-1]``, ``$.logit_bias["a"]``."""
    if (key_in := _KEY_IN.search(text)) is not None:
        return _entry(raw, key_in.group(1), bad_key=True)
    at = _AT_PATH.search(text)
    field = at.group(1) if at else "$"
    if field.endswith("[...]"):
        return _entry(raw, field.removesuffix("[...]"), bad_key=False)
    if (missing := _MISSING.search(text)) is not None:
        field = f"{field}.{missing.group(1)}"
    return field


def _entry(raw: dict[Any, Any], path: str, bad_key: bool) -> str:
    """``path[key]`` for the first entry of the map at ``path`` that the decoder refuses
    (its key if ``bad_key``, else its value); ``path`` if it cannot be found."""
    top = _TOP_FIELD.fullmatch(path)
    cls = _BY_TAG.get(raw.get("type"))
    entries = raw.get(top.group(1)) if top else None
    if cls is None or top is None or not isinstance(entries, dict):
        return path
    kind = next((f.type for f in msgspec.structs.fields(cls) if f.name == top.group(1)), None)
    for key, value in entries.items():
        try:
            msgspec.msgpack.decode(msgspec.msgpack.encode({key: value}), type=kind)
        except msgspec.ValidationError as exc:
            if bad_key == (_KEY_IN.search(str(exc)) is not None):
                return f"{path}[{_key_text(key)}]"
        except Exception:  # an unhashable or unencodable key: no better answer than the map
            break
    return path


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return json.dumps(clip(key, 60), ensure_ascii=False)
    if type(key) is int:
        return clip(str(key), 60)
    return clip(repr(key), 60)
