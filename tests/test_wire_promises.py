"""docs/PROTOCOL.md's promises on a real daemon, each as the doc words it: the handshake,
what a cancel's answer guarantees, what a warm stores and answers, UTF-8, the ``field`` of
a map entry, the chat message shape (issue 15, items 1-6)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import RawConn, _load, chat_tokens, reference

from mlxd.daemon.refusals import diagnose
from mlxd.protocol import decode_request, errors


@pytest.fixture(scope="module")
def wire(tiny_model: Path) -> Iterator[Daemon]:
    base = short_tmpdir()
    d = start_daemon(base / "mlxd.sock", "--model", f"tiny={tiny_model}")
    yield d
    code = d.stop()
    shutil.rmtree(base, ignore_errors=True)
    assert code == 0, d.log()


def raw_str(data: bytes) -> msgspec.Raw:
    """A MessagePack str of ``data`` as is, valid UTF-8 or not (up to 31 bytes)."""
    assert len(data) < 32
    return msgspec.Raw(bytes([0xA0 | len(data)]) + data)


def enc(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def refusal(conn: RawConn) -> dict[str, Any]:
    """The one message the daemon answers, then its close."""
    m = conn.recv()
    assert conn.is_closed_by_peer(), m
    conn.close()
    return m


# ------------------------------------------------------------------------ 1: the handshake

FIRST_FRAMES: list[tuple[bytes, str, int | None, str | None]] = [
    # (first frame's payload, code, id, field)
    (enc({"type": "frob", "id": 5}), errors.HANDSHAKE_REQUIRED, 5, None),
    (enc({"type": "generate", "id": 6, "prompt": 1}), errors.HANDSHAKE_REQUIRED, 6, None),
    (enc({"type": "ping", "id": 7}), errors.HANDSHAKE_REQUIRED, 7, None),
    (enc({"id": 8}), errors.HANDSHAKE_REQUIRED, 8, None),
    (enc({"type": "frob", "id": -1}), errors.HANDSHAKE_REQUIRED, None, None),
    (b"\xc1", errors.INVALID_MESSAGE, None, None),
    (enc([1, 2]), errors.INVALID_MESSAGE, None, None),
    (
        enc({"type": "hello", "protocol": 1, "client": raw_str(b"\xff")}),
        errors.INVALID_MESSAGE,
        None,
        None,
    ),
    (enc({"type": "hello", "protocol": "1"}), errors.INVALID_REQUEST, None, "$.protocol"),
    (enc({"type": "hello"}), errors.INVALID_REQUEST, None, "$.protocol"),
    (
        enc({"type": "hello", "protocol": 1, "client": "c" * 257}),
        errors.INVALID_REQUEST,
        None,
        "$.client",
    ),
    (enc({"type": "hello", "protocol": 2}), errors.UNSUPPORTED_VERSION, None, None),
    # A later version's hello may carry fields this one does not know: still its version.
    (enc({"type": "hello", "protocol": 2, "client": 7}), errors.UNSUPPORTED_VERSION, None, None),
]


@pytest.mark.parametrize(("payload", "code", "rid", "field"), FIRST_FRAMES)
def test_a_first_frame_that_is_not_a_valid_hello_is_refused_and_closed(
    wire: Daemon, payload: bytes, code: str, rid: int | None, field: str | None
) -> None:
    conn = RawConn(wire.socket, hello=False)
    conn.send_frame(payload)
    m = refusal(conn)
    assert (m["type"], m["code"], m.get("id"), m.get("field")) == ("error", code, rid, field), m


def test_a_second_hello_is_invalid_message_and_the_connection_serves_on(wire: Daemon) -> None:
    conn = RawConn(wire.socket)
    conn.send({"type": "hello", "protocol": 1})
    m = conn.recv()
    assert (m["code"], "id" in m) == (errors.INVALID_MESSAGE, False), m
    conn.send({"type": "ping", "id": 1})
    assert conn.recv() == {"type": "done", "id": 1}
    conn.close()


# ------------------------------------------------------------------------ 2: cancel


def _no_eos(tiny_model: Path) -> dict[int, float]:
    tokenizer = _load(str(tiny_model))[1]
    return {int(t): -100.0 for t in tokenizer.eos_token_ids}


def test_no_chunk_of_a_cancelled_request_follows_the_cancel_s_done(
    wire: Daemon, tiny_model: Path
) -> None:
    conn = RawConn(wire.socket)
    bias = _no_eos(tiny_model)  # the target runs until it is cancelled
    for trial in range(20):
        target, cancel = 2 * trial + 1, 2 * trial + 2
        conn.send(
            {"type": "generate", "id": target, "prompt": f"trial {trial}:", "max_tokens": 3000,
             "logit_bias": bias, "cache": False}
        )  # fmt: skip
        sent: list[int] = []
        while not sent:
            m = conn.recv()
            if m["type"] == "chunk":
                sent += m["tokens"]
        conn.send({"type": "cancel", "id": cancel, "target": target})
        answered = False
        while True:
            m = conn.recv()
            if m["id"] == cancel:
                assert m == {"type": "done", "id": cancel}
                answered = True
                continue
            assert m["id"] == target, m
            if m["type"] == "chunk":
                assert not answered, f"trial {trial}: a chunk of the target after the cancel's done"
                sent += m["tokens"]
                continue
            if m["type"] == "done":
                break
        assert m["finish_reason"] == "cancelled", m
        # What the done counts is what was sent.
        assert m["usage"]["completion_tokens"] == len(sent), (m, len(sent))
        if not answered:
            assert conn.recv() == {"type": "done", "id": cancel}
    conn.close()


def test_no_chunk_of_a_superseded_request_follows_the_new_one_s_first(
    wire: Daemon, tiny_model: Path
) -> None:
    conn = RawConn(wire.socket)
    bias = _no_eos(tiny_model)
    for trial in range(10):
        old, new = 2 * trial + 1, 2 * trial + 2
        common = {"type": "generate", "max_tokens": 3000, "logit_bias": bias, "cache": False}
        conn.send({**common, "id": old, "prompt": f"keystroke {trial}"})
        while conn.recv()["type"] != "chunk":
            pass
        conn.send({**common, "id": new, "prompt": f"keystroke {trial}!", "supersedes": old,
                   "max_tokens": 4})  # fmt: skip
        heard_new = False
        ended: set[int] = set()
        while ended != {old, new}:
            m = conn.recv()
            if m["id"] == new:
                heard_new = True
            elif m["type"] == "chunk":
                assert not heard_new, f"trial {trial}: old chunk after the new request's reply"
            if m["type"] in ("done", "error"):
                ended.add(m["id"])
                if m["id"] == old:
                    assert m["finish_reason"] == "cancelled", m
    conn.close()


# ------------------------------------------------------------------------ 3: warm

WARMED = "".join(f"# warmed line {i}: the cache holds exactly this.\n" for i in range(6))


def test_a_warm_stores_exactly_its_prompt_and_answers_only_documented_fields(
    wire: Daemon, tiny_model: Path
) -> None:
    conn = RawConn(wire.socket)
    conn.send({"type": "warm", "id": 1, "prompt": WARMED})
    _, done = conn.recv_until_end(1)
    assert done["type"] == "done", done
    assert set(done) == {"type", "id", "usage", "timings", "cache"}, done
    assert set(done["timings"]) == {"queue_s", "ttft_s", "total_s", "tokens_per_s"}, done
    assert done["timings"]["tokens_per_s"] == 0.0  # it decodes nothing
    assert done["usage"]["completion_tokens"] == 0
    n = done["usage"]["prompt_tokens"]
    conn.close()

    with wire.client() as client:
        again = client.generate(WARMED, max_tokens=8)
    assert again.done.cache.kind == "exact", again.done
    assert again.done.cache.miss_reason is None
    assert again.done.usage.cached_tokens == n - 1
    assert again.tokens == reference(tiny_model, WARMED, 8)[1]


def test_a_warmed_conversation_is_a_shorter_hit_for_its_next_generate(
    wire: Daemon, tiny_model: Path
) -> None:
    messages = [
        {"role": "system", "content": "You are warmed and precise, and you answer briefly."},
        {"role": "user", "content": "What is in the prompt cache now?"},
    ]
    with wire.client() as client:
        warmed = client.warm(messages=messages)
        assert warmed.finish_reason is None and warmed.usage.completion_tokens == 0
        done = client.chat(messages, max_tokens=8)
    assert done.done.cache.kind == "shorter", done.done
    assert done.done.usage.cached_tokens == warmed.usage.prompt_tokens
    assert done.tokens == reference(tiny_model, chat_tokens(tiny_model, messages), 8)[1]


# ------------------------------------------------------------------------ 4: UTF-8

BAD = raw_str(b"\xff\xfe")


def _map(*pairs: tuple[Any, Any]) -> bytes:
    """A MessagePack map of ``pairs`` in order, keys and values as given (Raw or not)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(enc(k) + enc(v) for k, v in pairs)


INVALID_UTF8 = [
    _map(("type", "ping"), ("id", 1), ("extra", BAD)),
    _map(("type", "ping"), ("id", 1), (BAD, 1)),
    _map(("type", "ping"), ("id", 1), ("extra", {"deeper": [BAD]})),
    _map(("type", "ping"), ("id", 1), ("extra", msgspec.Raw(_map((BAD, 1))))),
    _map(
        ("type", "generate"),
        ("id", 1),
        ("messages", [{"role": "user", "content": "hi", "name": BAD}]),
    ),
]


@pytest.mark.parametrize("payload", INVALID_UTF8)
def test_invalid_utf8_anywhere_is_invalid_message(wire: Daemon, payload: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_request(payload)
    conn = RawConn(wire.socket)
    conn.send_frame(payload)
    m = conn.recv()
    assert (m["type"], m["code"], "id" in m) == ("error", errors.INVALID_MESSAGE, False), m
    conn.send({"type": "ping", "id": 2})  # the connection serves on
    assert conn.recv() == {"type": "done", "id": 2}
    conn.close()


# ------------------------------------------------------------------------ 5: map entries

LOGIT_BIAS = [
    ({-1: 1.0}, "$.logit_bias[-1]"),
    ({"a": 1.0}, '$.logit_bias["a"]'),
    ({"5": 1.0}, '$.logit_bias["5"]'),
    ({3: 1.0, 5: 200.0}, "$.logit_bias[5]"),
    ({3: 1.0, 7: "high"}, "$.logit_bias[7]"),
]


@pytest.mark.parametrize(("bias", "field"), LOGIT_BIAS)
def test_a_bad_logit_bias_entry_is_named_by_its_key(
    wire: Daemon, bias: dict[Any, Any], field: str
) -> None:
    message = {"type": "generate", "id": 3, "prompt": "x", "logit_bias": bias}
    payload = enc(message)
    with pytest.raises(msgspec.ValidationError) as info:
        decode_request(payload)
    assert diagnose(payload, info.value).field == field
    conn = RawConn(wire.socket)
    conn.send(message)
    m = conn.recv()
    assert (m["code"], m["id"], m["field"]) == (errors.INVALID_REQUEST, 3, field), m
    conn.close()


# ------------------------------------------------------------------------ 6: chat messages

CHAT_REFUSALS = [
    ([{"role": "robot", "content": "hi"}], "$.messages[0].role"),
    ([{"role": "function", "content": "hi"}], "$.messages[0].role"),
    ([{"role": "user", "content": "hi"}, {"role": "user"}], "$.messages[1].content"),
    ([{"role": "user", "content": None}], "$.messages[0].content"),
]


@pytest.mark.parametrize(("messages", "field"), CHAT_REFUSALS)
@pytest.mark.parametrize("kind", ["generate", "warm"])
def test_a_chat_message_has_a_known_role_and_a_content(
    wire: Daemon, kind: str, messages: list[dict[str, Any]], field: str
) -> None:
    conn = RawConn(wire.socket)
    conn.send({"type": kind, "id": 4, "messages": messages, "max_tokens": 2})
    _, m = conn.recv_until_end(4)
    assert (m["type"], m.get("code"), m.get("field")) == ("error", errors.INVALID_REQUEST, field)
    conn.close()
