"""Framing: a 4-byte big-endian length, then one MessagePack message of that many bytes.

Helpers to encode a message into a frame and to decode a frame's payload, shared by the
daemon and every Python client. Transport-free: callers own the sockets.

Threading: ``Encoder``/``Decoder`` objects are not shared between threads by the callers;
each connection or client owns its own.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from .messages import Request, ServerMessage

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size


class Encoder:
    """Encodes messages straight into framed bytes, reusing one buffer."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._buffer = bytearray(64)

    def frame(self, message: Any) -> bytes:
        buf = self._buffer
        # Encode after a 4-byte gap, then fill the gap in: one copy, no concatenation.
        self._encoder.encode_into(message, buf, HEADER_SIZE)
        HEADER.pack_into(buf, 0, len(buf) - HEADER_SIZE)
        return bytes(buf)


def frame_length(header: bytes) -> int:
    return HEADER.unpack(header)[0]


request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
server_message_decoder: msgspec.msgpack.Decoder[ServerMessage] = msgspec.msgpack.Decoder(
    ServerMessage
)
_any_decoder = msgspec.msgpack.Decoder()


def decode_request(payload: bytes) -> Request:
    """Decode one request; raises ``msgspec.DecodeError`` (a ``ValidationError`` if typed),
    and nothing else, whatever the bytes. Strings must be UTF-8 everywhere, in the keys a
    request ignores too."""
    request = _decode(request_decoder, payload)
    # The typed decoder skips unknown keys without reading their strings: a second, untyped
    # pass reads every one. About as fast as the first (a microsecond for a keystroke's
    # frame, a millisecond or two per MB), and a request that gets here is valid otherwise.
    _decode(_any_decoder, payload)
    return request


def decode_server_message(payload: bytes) -> ServerMessage:
    """Decode one server message; raises ``msgspec.DecodeError`` and nothing else."""
    return _decode(server_message_decoder, payload)


def _decode(decoder: msgspec.msgpack.Decoder[Any], payload: bytes) -> Any:
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError:
        raise
    except RecursionError as exc:
        # msgspec recurses even into keys it ignores: a deep enough nest exhausts the stack.
        raise msgspec.DecodeError("the message is nested too deeply") from exc
    except ValueError as exc:  # msgspec lets UnicodeDecodeError out of a `type` tag
        raise msgspec.DecodeError(f"the message is malformed: {exc}") from exc
