"""The wire contract by itself: framing, tags, defaults and field constraints."""

from __future__ import annotations

import math

import msgspec
import pytest

from mlxd.protocol import (
    HEADER_SIZE,
    Chunk,
    Done,
    Encoder,
    Error,
    Generate,
    Usage,
    decode_request,
    decode_server_message,
    errors,
    frame_length,
)


def test_frame_is_length_then_msgpack() -> None:
    frame = Encoder().frame(Generate(id=7, prompt="hi"))
    assert frame_length(frame[:HEADER_SIZE]) == len(frame) - HEADER_SIZE
    assert msgspec.msgpack.decode(frame[HEADER_SIZE:]) == {
        "type": "generate",
        "id": 7,
        "prompt": "hi",
    }


def test_encoder_reuse_does_not_leak_between_frames() -> None:
    enc = Encoder()
    long = enc.frame(Chunk(id=1, text="x" * 1000, tokens=[1] * 100))
    short = enc.frame(Chunk(id=2, text="y", tokens=[2]))
    assert decode_server_message(long[HEADER_SIZE:]) == Chunk(
        id=1, text="x" * 1000, tokens=[1] * 100
    )
    assert decode_server_message(short[HEADER_SIZE:]) == Chunk(id=2, text="y", tokens=[2])


def test_server_messages_round_trip() -> None:
    done = Done(
        id=3,
        finish_reason="length",
        usage=Usage(prompt_tokens=1, cached_tokens=0, completion_tokens=2),
    )
    err = Error(id=4, code=errors.UNKNOWN_MODEL, message="nope")
    for message in (done, err):
        assert decode_server_message(Encoder().frame(message)[HEADER_SIZE:]) == message


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_p": -0.1},
        {"logit_bias": {1: math.inf}},
        {"id": -1},
        {"id": 2**53},
        {"seed": -5},
    ],
)
def test_out_of_range_values_are_refused_at_decode(bad: dict[str, object]) -> None:
    message = {"type": "generate", "id": 1, "prompt": "x", **bad}
    with pytest.raises(msgspec.ValidationError):
        decode_request(msgspec.msgpack.encode(message))


def test_error_codes_are_stable_strings() -> None:
    assert errors.INVALID_REQUEST == "invalid_request"
    assert "frame_too_large" in errors.ALL_CODES


def test_a_chunk_absorbs_every_per_token_field_of_the_next() -> None:
    # Both streams that fell behind (native and HTTP) merge chunks with Chunk.absorb: a
    # field it forgot would be lost from every merged chunk, under load only.
    import msgspec

    from mlxd.protocol import Chunk

    def sample(kind: object, n: int) -> object:
        # A value of ``kind`` that differs with ``n``: lists and strings, to be joined.
        if isinstance(kind, msgspec.inspect.UnionType):  # X | None: an X
            (kind,) = [t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType)]
        if isinstance(kind, msgspec.inspect.StrType):
            return f"s{n}"
        if isinstance(kind, msgspec.inspect.ListType):
            return [sample(kind.item_type, n)]
        if isinstance(kind, msgspec.inspect.IntType):
            return n
        if isinstance(kind, msgspec.inspect.FloatType):
            return float(n)
        if isinstance(kind, msgspec.inspect.BytesType):
            return bytes([n])
        if isinstance(kind, msgspec.inspect.DictType):  # a tool call's arguments
            return {f"k{n}": n}
        if isinstance(kind, msgspec.inspect.StructType):
            return kind.cls(**{f.name: sample(f.type, n) for f in kind.fields if f.required})
        raise AssertionError(f"no sample for {kind}")

    info = msgspec.inspect.type_info(Chunk)
    fields = [f for f in info.fields if f.name != "id"]
    first = Chunk(id=1, **{f.name: sample(f.type, 1) for f in fields})
    second = Chunk(id=1, **{f.name: sample(f.type, 2) for f in fields})
    first.absorb(second)
    for f in fields:
        assert getattr(first, f.name) == sample(f.type, 1) + sample(f.type, 2), f.name  # type: ignore[operator]
