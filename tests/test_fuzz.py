"""Hostile input: property tests of the protocol decoder, and fuzzing of a live daemon.

The decoder either returns a request or raises ``msgspec.DecodeError``, and the daemon's
diagnosis of any refused frame is a typed ``Error``. A live daemon, sent random bytes,
broken frames, hostile values and limit-breaking requests on raw sockets, answers each with
a typed error or closes that connection; it keeps answering, a witness client's greedy
stream during the fuzzing is token for token its solo run, and its memory stays bounded.

Example counts are bounded and derandomized for CI (150 per decoder property, 100 per
live one); ``MLXD_FUZZ_EXAMPLES=N`` gives every property N fresh random examples for a
long local run (see README, Testing).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import RawConn, reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxd.client import MlxdError
from mlxd.daemon.refusals import diagnose as _diagnose
from mlxd.protocol import (
    HEADER_SIZE,
    MAX_STOPS,
    Encoder,
    Error,
    Generate,
    Load,
    Unload,
    decode_request,
    decode_server_message,
    errors,
)
from mlxd.protocol.messages import _REQUESTS

# ---------------------------------------------------------------------------- example counts

_EXAMPLES = int(os.environ.get("MLXD_FUZZ_EXAMPLES", "0"))
settings.register_profile(
    "mlxd-fuzz",
    max_examples=_EXAMPLES or 150,
    deadline=None,  # a shared 2-core machine: no per-example timing
    derandomize=not _EXAMPLES,  # CI runs the same examples every time; long runs explore
    database=None if not _EXAMPLES else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("mlxd-fuzz")
# Each live example costs a round trip to the daemon: fewer of them.
LIVE = settings(FUZZ, max_examples=_EXAMPLES or 100)

DECODE_CODES = {errors.INVALID_MESSAGE, errors.UNKNOWN_MESSAGE_TYPE, errors.INVALID_REQUEST}
TEMPLATES: list[dict[str, Any]] = [
    {"type": "hello", "protocol": 1, "client": "fuzz"},
    {
        "type": "generate",
        "id": 1,
        "model": "tiny",
        "prompt": "def f():",
        "max_tokens": 4,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "logit_bias": {3: 1.5},
        "seed": 7,
        "stop": ["\n"],
        "keep_alive": 30.0,
        "cache": True,
        "supersedes": 0,
    },
    {"type": "generate", "id": 2, "messages": [{"role": "user", "content": "hi"}]},
    {"type": "generate", "id": 3, "tokens": [1, 2, 3], "max_tokens": 2},
    {"type": "cancel", "id": 4, "target": 1},
    {"type": "load", "id": 5, "model": "tiny", "keep_alive": -1},
    {"type": "unload", "id": 6, "model": "tiny"},
    {"type": "models", "id": 7},
    {"type": "clear_cache", "id": 8, "model": "tiny"},
    {"type": "stats", "id": 9},
    {"type": "ping", "id": 10},
    {"type": "health", "id": 11},
]


# ---------------------------------------------------------------------------- strategies


def raw_str(data: bytes) -> msgspec.Raw:
    """A MessagePack *str* holding ``data`` as is (msgspec would send bytes as bin)."""
    n = len(data)
    if n < 32:
        head = bytes([0xA0 | n])
    elif n < 256:
        head = bytes([0xD9, n])
    else:
        head = b"\xda" + struct.pack(">H", n)
    return msgspec.Raw(head + data)


def nested(depth: int) -> msgspec.Raw:
    """An array nested ``depth`` deep, sent without building it in Python."""
    return msgspec.Raw(b"\x91" * depth + b"\xc0")


def not_utf8() -> st.SearchStrategy[bytes]:
    return st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(width=32)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | not_utf8().map(raw_str)
    | st.integers(min_value=1, max_value=2000).map(nested)
)
msgpack_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=10) | st.integers(-5, 5), children, max_size=6)
    ),
    max_leaves=40,
)
hostile_values = (
    msgpack_values
    | st.sampled_from(
        [math.nan, -math.nan, math.inf, -math.inf, -1, -(2**63), 2**64 - 1, 2**53, 0, -0.0]
    )
    | st.integers(min_value=5_000, max_value=200_000).map(nested)
)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A valid request with one to three fields replaced, removed, or added."""
    message = dict(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*message, "type", "id", "model", "extra", ""]))
        action = draw(st.sampled_from(["replace", "replace", "delete", "not_utf8"]))
        if action == "delete":
            message.pop(key, None)
        elif action == "not_utf8":
            message[key] = raw_str(draw(not_utf8()))
        else:
            message[key] = draw(hostile_values)
    payload = msgspec.msgpack.encode(message)
    if draw(st.booleans()):
        return payload
    # And at the byte level: truncation, flipped bytes, or garbage appended.
    cut = draw(st.integers(0, len(payload)))
    b = bytearray(payload)
    for _ in range(draw(st.integers(0, 3))):
        if b:
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    return draw(st.sampled_from([payload[:cut], bytes(b), payload + draw(st.binary(max_size=8))]))


any_payload = (
    st.binary(max_size=200)
    | msgpack_values.map(msgspec.msgpack.encode)
    | st.dictionaries(st.sampled_from(["type", "id", "prompt"]), msgpack_values).map(
        msgspec.msgpack.encode
    )
    | mutated_requests()
)


# ---------------------------------------------------------------------------- the decoder


def decode_or_diagnose(payload: bytes) -> Any:
    """What the daemon makes of one frame's payload: a request, or the Error it answers."""
    try:
        request = decode_request(payload)
    except msgspec.DecodeError as exc:  # the one documented failure (ValidationError is one)
        error = _diagnose(payload, exc)
        assert isinstance(error, Error) and error.code in DECODE_CODES, error
        assert error.id is None or 0 <= error.id < 2**53
        assert len(error.message) <= 1024, "a refusal must not echo the hostile input back"
        assert error.field is None or error.field.startswith("$")
        # The answer itself must be a valid frame for a client.
        frame = Encoder().frame(error)
        assert decode_server_message(frame[HEADER_SIZE:]) == error
        return error
    assert isinstance(request, _REQUESTS)
    if isinstance(request, Generate):
        floats = [request.temperature, request.top_p, request.min_p, request.xtc_probability]
        floats += [request.xtc_threshold, request.repetition_penalty or 1.0]
        floats += [request.keep_alive or 0.0, *(request.logit_bias or {}).values()]
        assert all(math.isfinite(x) for x in floats), request
        assert request.max_tokens >= 1
    return request


@FUZZ
@given(any_payload)
def test_decoding_returns_a_request_or_one_typed_error(payload: bytes) -> None:
    decode_or_diagnose(payload)


@FUZZ
@given(mutated_requests())
def test_mutated_requests_decode_or_fail_typed(payload: bytes) -> None:
    decode_or_diagnose(payload)


@FUZZ
@given(st.data())
def test_strings_that_are_not_utf8_are_refused(data: st.DataObject) -> None:
    message = data.draw(st.sampled_from(TEMPLATES))
    key = data.draw(st.sampled_from([k for k, v in message.items() if isinstance(v, str)]))
    payload = msgspec.msgpack.encode({**message, key: raw_str(data.draw(not_utf8()))})
    result = decode_or_diagnose(payload)
    assert isinstance(result, Error)
    assert result.code == errors.INVALID_MESSAGE, result


@pytest.mark.parametrize("where", ["id", "prompt", "extra", "logit_bias"])
@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_deep_nesting_is_a_decode_error(where: str, depth: int) -> None:
    # Regression: an ignored key nested deeper than the interpreter's recursion limit made
    # the decoder raise RecursionError instead of its DecodeError.
    message = {"type": "generate", "id": 1, "prompt": "x", where: nested(depth)}
    with pytest.raises(msgspec.DecodeError):
        decode_request(msgspec.msgpack.encode(message))
    assert decode_or_diagnose(msgspec.msgpack.encode(message)).code in DECODE_CODES


def test_a_huge_unknown_type_is_not_echoed_back() -> None:
    # Regression: the refusal quoted the whole `type` string, up to the frame limit.
    error = decode_or_diagnose(msgspec.msgpack.encode({"type": "x" * 100_000, "id": 3}))
    assert error.code == errors.UNKNOWN_MESSAGE_TYPE and error.id == 3
    assert len(error.message) < 300


@FUZZ
@given(
    st.floats(min_value=0.01, max_value=100.0),
    st.floats(min_value=0.01, max_value=0.99),
    st.floats(min_value=0.01, max_value=1.0),
    st.floats(min_value=0.01, max_value=1.0),
)
def test_sampling_values_compile_once_not_per_value(
    temperature: float, top_p: float, min_p: float, xtc: float
) -> None:
    # Regression: mlx-lm's compiled sampling steps took these values as compile-time
    # constants, so each distinct value compiled anew (about 2 s of the worker's time on a
    # CPU, stalling every stream) and stayed cached for good.
    import mlx.core as mx

    from mlxd.daemon.sampling import TRACES, make_sampling

    request = Generate(
        id=1, prompt="x", temperature=temperature, top_p=top_p, min_p=min_p,
        xtc_probability=xtc, xtc_threshold=0.1, top_k=5000, seed=3,
    )  # fmt: skip
    sampler, _ = make_sampling(request, vocab_size=1024)
    logits = mx.arange(1024, dtype=mx.float32).reshape(1, 1024) / 100
    token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item()
    assert 0 <= token < 1024
    # One trace per step for this shape and dtype, whatever the values (a few, if another
    # test traced other shapes first).
    assert TRACES and max(TRACES.values()) <= 4, TRACES


def test_the_sampler_is_mlx_lm_s() -> None:
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from mlxd.daemon.sampling import make_sampling

    options = {"temperature": 0.9, "top_p": 0.9, "min_p": 0.02, "top_k": 40}
    options |= {"xtc_probability": 0.3, "xtc_threshold": 0.2}
    ours, _ = make_sampling(Generate(id=1, prompt="x", **options), vocab_size=1024)
    theirs = make_sampler(
        temp=0.9, top_p=0.9, min_p=0.02, top_k=40, xtc_probability=0.3, xtc_threshold=0.2
    )
    mx.random.seed(5)
    logits = mx.random.normal((1, 1024)) * 3
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    drawn = []
    for sampler in (ours, theirs):
        mx.random.seed(11)
        drawn.append([sampler(logprobs).item() for _ in range(40)])
    assert drawn[0] == drawn[1]


# ---------------------------------------------------------------------------- a live daemon

FRAME_LIMIT = 1024 * 1024
MAX_IN_FLIGHT = 8
MAX_CONNECTIONS = 16
MAX_TOKENS = 2048
MAX_PROMPT_TOKENS = 1024
WITNESS_PROMPT = "def witness(x):"
WITNESS_TOKENS = 120
PING_ID = 2**53 - 1


@pytest.fixture(scope="module")
def fuzz_daemon(tiny_model: Path) -> Iterator[Daemon]:
    """A daemon with small limits, a models folder, and a model just outside that folder."""
    base = short_tmpdir()
    shutil.copytree(tiny_model, base / "models" / "inside")
    shutil.copytree(tiny_model, base / "outside")
    d = start_daemon(
        base / "mlxd.sock",
        "--model", f"tiny={tiny_model}",
        "--default-model", "tiny",
        "--models-dir", str(base / "models"),
        "--max-frame-bytes", str(FRAME_LIMIT),
        "--max-requests-per-connection", str(MAX_IN_FLIGHT),
        "--max-connections", str(MAX_CONNECTIONS),
        "--max-tokens-limit", str(MAX_TOKENS),
        "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
    )  # fmt: skip
    yield d
    code = d.stop()
    shutil.rmtree(base, ignore_errors=True)
    assert code == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


@pytest.fixture(autouse=True)
def _connections_closed(request: pytest.FixtureRequest) -> None:
    """Each live test starts with the earlier tests' connections gone: the daemon notices a
    closed connection asynchronously, and the connection limit here is small."""
    if "fuzz_daemon" not in request.fixturenames:
        return
    daemon = request.getfixturevalue("fuzz_daemon")
    deadline = time.monotonic() + 30
    while True:
        try:
            with daemon.client() as c:
                if c.stats().connections <= 1:  # this one
                    return
        except (MlxdError, OSError):
            pass  # refused while the earlier connections are still counted
        assert time.monotonic() < deadline, "earlier tests' connections never closed"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def witness_tokens(tiny_model: Path) -> list[int]:
    return reference(tiny_model, WITNESS_PROMPT, WITNESS_TOKENS)[1]


class Witness:
    """Another client streaming one greedy completion over and over while hostile input
    hits the daemon: every run must be its solo run, token for token."""

    def __init__(self, daemon: Daemon, expected: list[int]) -> None:
        self._daemon = daemon
        self._expected = expected
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="witness")
        self.runs: list[tuple[str | None, list[int]]] = []
        self.error: BaseException | None = None

    def __enter__(self) -> Witness:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with self._daemon.client() as client:
                while not self._stop.is_set() or not self.runs:
                    done = client.generate(WITNESS_PROMPT, max_tokens=WITNESS_TOKENS)
                    self.runs.append((done.done.finish_reason, done.tokens))
        except BaseException as exc:
            self.error = exc

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(120)
        if exc_info[0] is None:
            assert not self._thread.is_alive(), "the witness stream hung"
            assert self.error is None, repr(self.error)
            assert self.runs
            for reason, tokens in self.runs:
                assert (reason, tokens) == ("length", self._expected), (reason, tokens)


def recv_all(conn: RawConn, timeout: float = 30) -> list[dict[str, Any]]:
    """Every frame until the daemon closes the connection (a bounded wait)."""
    conn.sock.settimeout(timeout)
    messages = []
    while True:
        try:
            messages.append(conn.recv())
        except (ConnectionError, OSError):
            return messages


def assert_typed(message: dict[str, Any]) -> None:
    """A server message that a client can decode; an error carries a stable code, never
    internal_error (that would be a bug the input found)."""
    decode_server_message(msgspec.msgpack.encode(message))
    if message["type"] == "error":
        assert message["code"] in errors.ALL_CODES, message
        assert message["code"] != errors.INTERNAL_ERROR, message


def until_ping(conn: RawConn) -> list[dict[str, Any]]:
    """Send a ping; every message before its answer (the answer proves the connection and
    the daemon still serve)."""
    conn.send({"type": "ping", "id": PING_ID})
    seen = []
    while True:
        m = conn.recv()
        if m["type"] == "done" and m.get("id") == PING_ID:
            return seen
        assert_typed(m)
        seen.append(m)


def expect_error(conn: RawConn, code: str, rid: int | None = None) -> dict[str, Any]:
    """The next message for ``rid`` (chunks of other requests skipped) is this error."""
    while True:
        m = conn.recv()
        if m.get("id") == rid and m["type"] != "chunk":
            assert (m["type"], m["code"]) == ("error", code), m
            return m


def assert_closed_after(conn: RawConn, code: str) -> None:
    messages = recv_all(conn)
    assert [m["code"] for m in messages] == [code], messages
    assert "id" not in messages[0]
    conn.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def harmless(payload: bytes) -> bool:
    """Not a valid ``load`` or ``unload``: those change what is resident (an unload ends the
    witness's stream as cancelled), by design, so they are not hostile input. Nor empty."""
    try:
        request = decode_request(payload)
    except msgspec.DecodeError:
        return bool(payload)
    return not isinstance(request, Load | Unload)


def connect(daemon: Daemon) -> RawConn | dict[str, Any]:
    """A connection past its welcome, or the daemon's refusal (the connection then closed)."""
    conn = RawConn(daemon.socket, hello=False)
    # Refused (and closed) before the hello went out: the refusal is still there to read.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.send({"type": "hello", "protocol": 1})
    first = conn.recv()
    if first["type"] == "welcome":
        return conn
    assert conn.is_closed_by_peer()
    conn.close()
    return first


def ends(conn: RawConn, ids: set[int | None]) -> dict[int | None, dict[str, Any]]:
    """Read until each id in ``ids`` has ended (None: a refusal without an id)."""
    result: dict[int | None, dict[str, Any]] = {}
    while not ids <= result.keys():
        m = conn.recv()
        assert_typed(m)
        if m["type"] in ("done", "error"):
            result[m.get("id")] = m
    return result


def test_broken_framing_gets_a_typed_error_then_a_close(
    fuzz_daemon: Daemon, witness_tokens: list[int]
) -> None:
    sock = fuzz_daemon.socket
    with Witness(fuzz_daemon, witness_tokens):
        for length, code in (
            (0, errors.INVALID_FRAME),
            (2**32 - 1, errors.FRAME_TOO_LARGE),
            (FRAME_LIMIT + 1, errors.FRAME_TOO_LARGE),
        ):
            for hello in (True, False):
                conn = RawConn(sock, hello=hello)
                conn.sock.sendall(struct.pack(">I", length))
                assert_closed_after(conn, code)
        # A frame of exactly the limit is read whole: junk inside is an error, not a close.
        conn = RawConn(sock)
        conn.send_frame(b"\xc1" * FRAME_LIMIT)
        assert conn.recv()["code"] == errors.INVALID_MESSAGE
        until_ping(conn)
        conn.close()
        # Truncated frames, the peer gone or half-closed: nothing to answer, nothing broken.
        for piece in (
            b"\x00",
            b"\x00\x00\x01",
            struct.pack(">I", 100) + b"\x82\xa4type\xa4ping",
            struct.pack(">I", FRAME_LIMIT) + b"x" * 100_000,
        ):
            conn = RawConn(sock)
            conn.sock.sendall(piece)
            conn.close()
            conn = RawConn(sock)
            conn.sock.sendall(piece)
            conn.sock.shutdown(socket.SHUT_WR)
            assert recv_all(conn) == []
            conn.close()
        with fuzz_daemon.client() as client:
            assert client.ping() > 0


def test_random_byte_streams_get_typed_errors_or_a_close(
    fuzz_daemon: Daemon, witness_tokens: list[int]
) -> None:
    @LIVE
    @given(
        st.booleans(),
        st.binary(min_size=1, max_size=400)
        | st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=200)).map(
            lambda t: struct.pack(">I", t[0]) + t[1]
        )
        | any_payload.filter(harmless).map(lambda p: struct.pack(">I", len(p)) + p),
    )
    def one(hello: bool, data: bytes) -> None:
        conn = RawConn(fuzz_daemon.socket, hello=hello)
        conn.sock.sendall(data)
        conn.sock.shutdown(socket.SHUT_WR)  # then the daemon must close: no hang
        for m in recv_all(conn):
            assert_typed(m)
        conn.close()

    with Witness(fuzz_daemon, witness_tokens):
        one()
        with fuzz_daemon.client() as client:
            assert client.ping() > 0


def test_hostile_frames_get_typed_errors_and_the_connection_serves_on(
    fuzz_daemon: Daemon, witness_tokens: list[int]
) -> None:
    @LIVE
    @given(any_payload.filter(harmless))
    def one(payload: bytes) -> None:
        conn = RawConn(fuzz_daemon.socket)
        conn.send_frame(payload)
        until_ping(conn)
        conn.close()

    with Witness(fuzz_daemon, witness_tokens):
        one()


F32_NAN = msgspec.Raw(b"\xca\x7f\xc0\x00\x00")
F32_INF = msgspec.Raw(b"\xca\x7f\x80\x00\x00")
HOSTILE_GENERATES: list[tuple[dict[str, Any], str, str | None]] = [
    # (fields of a generate, error code, field); "$" alone: no field is named
    ({"prompt": 123}, errors.INVALID_REQUEST, "$.prompt"),
    ({"prompt": raw_str(b"\xff\xfe")}, errors.INVALID_MESSAGE, None),
    ({"prompt": "x", "stop": [raw_str(b"\xc3\x28")]}, errors.INVALID_MESSAGE, None),
    (
        {"messages": [{"role": "user", "content": raw_str(b"\xed\xa0\x80")}]},
        errors.INVALID_MESSAGE,
        None,
    ),
    ({"prompt": "x", "max_tokens": 0}, errors.INVALID_REQUEST, "$.max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, errors.INVALID_REQUEST, "$.max_tokens"),
    ({"prompt": "x", "max_tokens": MAX_TOKENS + 1}, errors.INVALID_REQUEST, "$.max_tokens"),
    ({"prompt": "x", "max_tokens": 2**64 - 1}, errors.INVALID_REQUEST, "$.max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, errors.INVALID_REQUEST, "$.max_tokens"),
    ({"prompt": "x", "temperature": math.nan}, errors.INVALID_REQUEST, "$.temperature"),
    ({"prompt": "x", "temperature": F32_NAN}, errors.INVALID_REQUEST, "$.temperature"),
    ({"prompt": "x", "temperature": math.inf}, errors.INVALID_REQUEST, "$.temperature"),
    ({"prompt": "x", "temperature": -math.inf}, errors.INVALID_REQUEST, "$.temperature"),
    ({"prompt": "x", "temperature": -0.5}, errors.INVALID_REQUEST, "$.temperature"),
    ({"prompt": "x", "temperature": "hot"}, errors.INVALID_REQUEST, "$.temperature"),
    ({"prompt": "x", "top_p": math.nan}, errors.INVALID_REQUEST, "$.top_p"),
    ({"prompt": "x", "top_p": F32_INF}, errors.INVALID_REQUEST, "$.top_p"),
    ({"prompt": "x", "top_p": -0.1}, errors.INVALID_REQUEST, "$.top_p"),
    ({"prompt": "x", "min_p": math.nan}, errors.INVALID_REQUEST, "$.min_p"),
    ({"prompt": "x", "top_k": -1}, errors.INVALID_REQUEST, "$.top_k"),
    ({"prompt": "x", "xtc_probability": math.inf}, errors.INVALID_REQUEST, "$.xtc_probability"),
    ({"prompt": "x", "xtc_threshold": math.nan}, errors.INVALID_REQUEST, "$.xtc_threshold"),
    ({"prompt": "x", "repetition_penalty": math.nan}, errors.INVALID_REQUEST, None),
    ({"prompt": "x", "repetition_penalty": -1.0}, errors.INVALID_REQUEST, None),
    ({"prompt": "x", "repetition_context_size": 0}, errors.INVALID_REQUEST, None),
    ({"prompt": "x", "logit_bias": {1: math.nan}}, errors.INVALID_REQUEST, None),
    ({"prompt": "x", "logit_bias": {-1: 1.0}}, errors.INVALID_REQUEST, None),
    ({"prompt": "x", "logit_bias": {10**9: 1.0}}, errors.INVALID_REQUEST, "$.logit_bias"),
    ({"prompt": "x", "keep_alive": math.inf}, errors.INVALID_REQUEST, "$.keep_alive"),
    ({"prompt": "x", "seed": -1}, errors.INVALID_REQUEST, "$.seed"),
    ({"prompt": "x", "seed": 2**64 - 1}, errors.INVALID_REQUEST, "$.seed"),
    ({"tokens": [-1]}, errors.INVALID_REQUEST, "$.tokens[0]"),
    ({"tokens": [2**64 - 1]}, errors.INVALID_REQUEST, "$.tokens"),
    ({"tokens": []}, errors.INVALID_REQUEST, "$.prompt"),
    ({"tokens": "abc"}, errors.INVALID_REQUEST, "$.tokens"),
    ({"prompt": "x", "tokens": [1]}, errors.INVALID_REQUEST, "$.prompt"),
    ({}, errors.INVALID_REQUEST, "$.prompt"),
    ({"messages": "hi"}, errors.INVALID_REQUEST, "$.messages"),
    ({"messages": [{"role": 1}]}, errors.INVALID_REQUEST, "$.messages[0].role"),
    ({"messages": [{"content": "hi"}]}, errors.INVALID_REQUEST, "$.messages[0].role"),
    ({"prompt": "x", "stop": [""]}, errors.INVALID_REQUEST, "$.stop[0]"),
    ({"prompt": "x", "stop": "\n"}, errors.INVALID_REQUEST, "$.stop"),
    # Regression: stop strings were unbounded in number, and each is matched at every token
    # on the one worker thread: 100k of them stalled every stream for 0.2 s a token.
    ({"prompt": "x", "stop": ["s"] * (MAX_STOPS + 1)}, errors.INVALID_REQUEST, "$.stop"),
    ({"prompt": "x", "stop": ["s" * 1025]}, errors.INVALID_REQUEST, "$.stop[0]"),
    ({"prompt": "x", "cache": "yes"}, errors.INVALID_REQUEST, "$.cache"),
    ({"prompt": "x", "supersedes": -1}, errors.INVALID_REQUEST, "$.supersedes"),
    ({"prompt": "x", "model": ""}, errors.INVALID_REQUEST, "$.model"),
    ({"prompt": "x", "model": "m" * 513}, errors.INVALID_REQUEST, "$.model"),
    ({"prompt": "x", "model": ["tiny"]}, errors.INVALID_REQUEST, "$.model"),
    ({"prompt": "x", "model": "no-such-model"}, errors.UNKNOWN_MODEL, None),
    ({"prompt": "x", "extra": nested(10_000)}, errors.INVALID_MESSAGE, None),
    ({"prompt": nested(10_000)}, errors.INVALID_MESSAGE, None),
]


def test_hostile_values_get_typed_errors(fuzz_daemon: Daemon, witness_tokens: list[int]) -> None:
    with Witness(fuzz_daemon, witness_tokens):
        conn = RawConn(fuzz_daemon.socket)
        for rid, (fields, code, field) in enumerate(HOSTILE_GENERATES, start=1):
            conn.send({"type": "generate", "id": rid, **fields})
            m = conn.recv()
            assert (m["type"], m["code"]) == ("error", code), (fields, m)
            # Refused before any field could be read: no id to give.
            assert m.get("id") == (None if code == errors.INVALID_MESSAGE else rid), m
            if field is not None:
                assert m["field"] == field, (fields, m)
        for bad_id in ("seven", -1, 2**53, 2**64 - 1, 1.0, None):
            conn.send({"type": "generate", "id": bad_id, "prompt": "x"})
            m = conn.recv()
            assert (m["code"], m["field"], "id" in m) == (errors.INVALID_REQUEST, "$.id", False)
        conn.send({"type": "cancel", "id": 900})
        assert conn.recv()["field"] == "$.target"
        conn.send({"type": "cancel", "id": 901, "target": 12345})  # never existed: not an error
        assert conn.recv() == {"type": "done", "id": 901}
        conn.send({"type": "hello", "protocol": 1})
        assert conn.recv()["code"] == errors.INVALID_MESSAGE
        conn.send({"type": 7, "id": 902})
        assert conn.recv()["code"] == errors.UNKNOWN_MESSAGE_TYPE
        until_ping(conn)
        conn.close()


def test_degenerate_but_valid_sampling_values_are_served(
    fuzz_daemon: Daemon, witness_tokens: list[int]
) -> None:
    # Regression: a top_k of at least the vocabulary made mlx-lm's sampler raise inside the
    # batch step, which failed every sequence batched with it (the witness's too).
    with Witness(fuzz_daemon, witness_tokens) as witness:
        while not witness.runs and witness.error is None:
            time.sleep(0.01)  # the witness is streaming: what follows joins its batch
        conn = RawConn(fuzz_daemon.socket)
        odd = [
            {"temperature": 1.0, "top_k": 1024, "stop": [f"{i:04d}" for i in range(MAX_STOPS)]},
            {"temperature": 1.0, "top_k": 2**63},
            {"temperature": 5e-324},
            {"temperature": 100.0, "top_p": 5e-324, "min_p": 1.0},
            {"temperature": 0.5, "xtc_probability": 1.0, "xtc_threshold": 0.5},
            {"temperature": 1.0, "repetition_penalty": 1e-300, "repetition_context_size": 10**6},
            {"temperature": 1.0, "logit_bias": {i: 100.0 for i in range(1024)}},
            {"temperature": 1.0, "seed": 2**63 - 1, "keep_alive": 10 * 365 * 86400.0},
        ]
        for rid, fields in enumerate(odd, start=1):
            conn.send({"type": "generate", "id": rid, "prompt": "odd", "max_tokens": 8, **fields})
        got = ends(conn, set(range(1, len(odd) + 1)))
        assert all(m["type"] == "done" for m in got.values()), got
        conn.close()


def test_model_names_cannot_leave_the_models_folder(fuzz_daemon: Daemon) -> None:
    outside = fuzz_daemon.socket.parent / "outside"  # a valid model, one level up
    names = [
        "../outside", "../../outside", "inside/../../outside", str(outside), "/etc/passwd",
        "..", ".", "~", "..\\outside", "%2e%2e%2foutside", "inside\x00", "\x00", "o" * 300,
        "inside/", " inside", "tiny/../inside",
    ]  # fmt: skip
    conn = RawConn(fuzz_daemon.socket)
    for rid, name in enumerate(names, start=1):
        # Regression: a NUL byte or a name over the file system's limit was internal_error.
        conn.send({"type": "generate", "id": rid, "prompt": "x", "max_tokens": 1, "model": name})
        assert expect_error(conn, errors.UNKNOWN_MODEL, rid)
        conn.send({"type": "load", "id": 1000 + rid, "model": name})
        assert expect_error(conn, errors.UNKNOWN_MODEL, 1000 + rid)
    # The models folder itself serves.
    conn.send({"type": "generate", "id": 999, "prompt": "x", "max_tokens": 2, "model": "inside"})
    assert ends(conn, {999})[999]["type"] == "done"
    conn.close()
    with fuzz_daemon.client() as client:
        paths = {Path(m.path).resolve() for m in client.models()}
        assert outside.resolve() not in paths
        client.unload("inside")


def test_prompts_over_the_limits_are_prompt_too_long(
    fuzz_daemon: Daemon, daemon: Daemon, witness_tokens: list[int]
) -> None:
    with Witness(fuzz_daemon, witness_tokens):
        conn = RawConn(fuzz_daemon.socket)
        too_long: list[dict[str, Any]] = [
            {"tokens": [5] * (MAX_PROMPT_TOKENS + 1)},
            {"tokens": [5] * 200_000},  # a huge array, inside the frame limit
            {"prompt": "ab " * 100_000},
            {"messages": [{"role": "user", "content": "hi"}] * 3000},
        ]
        for rid, fields in enumerate(too_long, start=1):
            conn.send({"type": "generate", "id": rid, "max_tokens": 1, **fields})
            assert expect_error(conn, errors.PROMPT_TOO_LONG, rid)
        conn.send({"type": "generate", "id": 9, "tokens": [5] * MAX_PROMPT_TOKENS, "max_tokens": 1})
        assert ends(conn, {9})[9]["type"] == "done"  # the limit itself is allowed
        conn.close()
    # With no configured cap, the model's context (4096 for the tiny model) is the limit.
    conn = RawConn(daemon.socket)
    conn.send({"type": "generate", "id": 1, "tokens": [5] * 4096, "max_tokens": 1})
    assert "4096" in expect_error(conn, errors.PROMPT_TOO_LONG, 1)["message"]
    conn.close()


def test_too_many_requests_in_flight_on_one_connection(
    fuzz_daemon: Daemon, witness_tokens: list[int]
) -> None:
    with Witness(fuzz_daemon, witness_tokens):
        conn = RawConn(fuzz_daemon.socket)
        long = {"type": "generate", "prompt": "count:", "max_tokens": MAX_TOKENS}
        for rid in range(MAX_IN_FLIGHT):
            conn.send({**long, "id": rid})
        conn.send({**long, "id": 100})
        assert expect_error(conn, errors.TOO_MANY_REQUESTS, 100)
        until_ping(conn)  # at the limit, ping and cancel still get through
        for rid in range(MAX_IN_FLIGHT):
            conn.send({"type": "cancel", "id": 200 + rid, "target": rid})
        got = ends(conn, set(range(MAX_IN_FLIGHT)))
        assert {m["type"] for m in got.values()} == {"done"}
        conn.send({**long, "id": 300, "max_tokens": 2})
        assert ends(conn, {300})[300]["finish_reason"] == "length"
        conn.close()


def test_too_many_connections_are_refused_and_others_serve_on(
    fuzz_daemon: Daemon, witness_tokens: list[int]
) -> None:
    opened: list[RawConn] = []
    try:
        _refused_past_the_limit(fuzz_daemon, witness_tokens, opened)
    finally:  # a failure here must not leave the next tests without connections
        for conn in opened:
            conn.close()


def _refused_past_the_limit(
    fuzz_daemon: Daemon, witness_tokens: list[int], opened: list[RawConn]
) -> None:
    with Witness(fuzz_daemon, witness_tokens):
        refusal: dict[str, Any] | None = None
        for _ in range(MAX_CONNECTIONS + 1):
            conn = connect(fuzz_daemon)
            if isinstance(conn, dict):
                refusal = conn
                break
            opened.append(conn)
        assert refusal is not None and len(opened) < MAX_CONNECTIONS, len(opened)
        assert refusal == {
            "type": "error",
            "code": errors.OVERLOADED,
            "message": "too many connections",
        }
        for conn in opened:  # the connections already in are untouched
            until_ping(conn)
        opened.pop().close()
        deadline = time.monotonic() + 10
        while isinstance(again := connect(fuzz_daemon), dict) and time.monotonic() < deadline:
            time.sleep(0.05)  # the daemon notices the close asynchronously
        assert isinstance(again, RawConn)
        opened.append(again)


def hostile_burst(daemon: Daemon) -> None:
    """One round of hostile input, each piece answered as it must be."""
    conn = RawConn(daemon.socket)
    conn.send_frame(b"\xc1" * (FRAME_LIMIT - 1))
    conn.send({"type": "generate", "id": 1, "prompt": "x", "extra": nested(200_000)})
    conn.send({"type": "ping", "id": 2, **{f"k{i}": i for i in range(20_000)}})
    conn.send({"type": "generate", "id": 3, "tokens": [5] * 100_000})
    conn.send({"type": "generate", "id": 4, "prompt": "ab " * 30_000})
    conn.send({"type": "generate", "id": 5, "prompt": "x", "model": "../outside"})
    conn.send({"type": "generate", "id": 6, "prompt": "x", "logit_bias": {10**9: 1.0}})
    conn.send({"type": "generate", "id": 7, "prompt": "x", "temperature": math.nan})
    conn.send({"type": "generate", "id": 8, "prompt": "x", "max_tokens": 2, "temperature": 0.7})
    got = ends(conn, {None, 2, 3, 4, 5, 6, 7, 8})
    assert [got[i]["type"] for i in (2, 8)] == ["done", "done"]
    assert [got[i]["code"] for i in (3, 4, 5, 6, 7)] == [
        errors.PROMPT_TOO_LONG, errors.PROMPT_TOO_LONG, errors.UNKNOWN_MODEL,
        errors.INVALID_REQUEST, errors.INVALID_REQUEST,
    ]  # fmt: skip
    long = {"type": "generate", "prompt": "count:", "max_tokens": MAX_TOKENS}
    for rid in range(10, 11 + MAX_IN_FLIGHT):
        conn.send({**long, "id": rid})
    expect_error(conn, errors.TOO_MANY_REQUESTS, 10 + MAX_IN_FLIGHT)
    conn.close()  # mid-stream: cancels the rest
    for piece in (struct.pack(">I", FRAME_LIMIT) + b"x" * 200_000, struct.pack(">I", 0)):
        conn = RawConn(daemon.socket)
        conn.sock.sendall(piece)
        conn.close()


def wait_for_the_witness_alone(daemon: Daemon, timeout: float = 30) -> None:
    """Until only the witness's request is in flight: cancels end asynchronously."""
    deadline = time.monotonic() + timeout
    with daemon.client() as client:
        while (s := client.stats()).active_sequences > 1 or s.requests_in_flight > 2:
            assert time.monotonic() < deadline, s
            time.sleep(0.02)


def test_hostile_bursts_do_not_grow_the_daemon_s_memory(
    fuzz_daemon: Daemon, witness_tokens: list[int]
) -> None:
    pid = fuzz_daemon.proc.pid
    with Witness(fuzz_daemon, witness_tokens):
        for _ in range(3):  # warm-up: allocator pools, compiled steps, the tokenizer's caches
            hostile_burst(fuzz_daemon)
        wait_for_the_witness_alone(fuzz_daemon)
        before = rss_bytes(pid)
        for _ in range(12):
            hostile_burst(fuzz_daemon)
        wait_for_the_witness_alone(fuzz_daemon)
        after = rss_bytes(pid)
    # Each burst sends about 2 MB of hostile frames that decode into more (a 20k-key map, a
    # 100k-token list): retained, 12 bursts would add some 60 MB. The margin allows for
    # allocator noise; this is a leak check, not a measurement.
    assert after - before < 24 * 2**20, (before, after)


def test_a_client_that_never_reads_is_paused_not_buffered(
    fuzz_daemon: Daemon, witness_tokens: list[int]
) -> None:
    # Regression: the daemon read on and queued every reply for a client that never read
    # them: 3.4 million one-byte frames in 20 s grew it by 240 MB.
    pid = fuzz_daemon.proc.pid
    with Witness(fuzz_daemon, witness_tokens):
        before = rss_bytes(pid)
        conn = RawConn(fuzz_daemon.socket, timeout=3)
        junk = (struct.pack(">I", 1) + b"\xc1") * 10_000
        blocked = False
        for _ in range(400):  # 4 million refused frames at most
            try:
                conn.sock.sendall(junk)
            except TimeoutError:
                blocked = True  # the daemon stopped reading: its backlog is bounded
                break
        grown = rss_bytes(pid) - before
        conn.close()
        assert blocked
        assert grown < 32 * 2**20, grown
        with fuzz_daemon.client() as client:
            assert client.ping() > 0
