"""docs/PROTOCOL.md's byte-level example is true: its bytes decode with the protocol's own
decoders into the messages it names, and its annotations are what the bytes say."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from mlxd.protocol import (
    Chunk,
    Done,
    Generate,
    Hello,
    Welcome,
    decode_request,
    decode_server_message,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"


def example_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protocol_example", DOCS / "protocol_example.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented_frames(ex: ModuleType) -> list[tuple[str, str, int, bytes, list[str]]]:
    """(direction, type, stated size, bytes, annotated lines) for each frame in the doc."""
    doc = (DOCS / "PROTOCOL.md").read_text()
    block = doc[doc.index(ex.BEGIN) : doc.index(ex.END)]
    body = block[block.index("```\n") + 4 : block.rindex("```")]
    frames = []
    for part in body.strip("\n").split("\n\n"):
        head, *lines = part.split("\n")
        m = re.fullmatch(r"(client|server) → (?:client|server): (\w+) \((\d+) bytes\)", head)
        assert m, head
        data = bytes.fromhex(" ".join(line[: ex.HEX_WIDTH] for line in lines))
        frames.append((m[1], m[2], int(m[3]), data, lines))
    return frames


def test_the_worked_example_decodes_as_documented() -> None:
    ex = example_module()
    frames = documented_frames(ex)
    assert [(d, t) for d, t, *_ in frames] == [
        ("client", "hello"),
        ("server", "welcome"),
        ("client", "generate"),
        ("server", "chunk"),
        ("server", "chunk"),
        ("server", "done"),
    ]
    decoded = []
    for direction, _, size, data, lines in frames:
        assert len(data) == size
        assert int.from_bytes(data[:4], "big") == size - 4
        assert ex.annotate(data) == lines  # every annotation says what its bytes are
        decode = decode_request if direction == "client" else decode_server_message
        decoded.append(decode(data[4:]))
    hello, welcome, generate, *chunks, done = decoded
    assert hello == Hello(protocol=1, client="example")
    assert isinstance(welcome, Welcome) and welcome.protocol == 1
    assert generate == Generate(id=1, prompt="Hi", max_tokens=2)
    assert all(isinstance(c, Chunk) and c.id == 1 for c in chunks)
    assert isinstance(done, Done) and done.id == 1 and done.finish_reason == "length"
    assert done.usage is not None
    assert done.usage.completion_tokens == sum(len(c.tokens) for c in chunks) == 2


def test_annotate_reads_what_the_encoder_writes() -> None:
    from mlxd.protocol import Encoder

    frame = Encoder().frame(
        Chunk(id=300, text="é" * 40, tokens=[1, 200, 70000, 2**33])  # str8, u16, u32, u64
    )
    lines = example_module().annotate(frame)
    assert any('"text": "' + "é" * 40 + '"' in line for line in lines)
    assert any('"tokens": [1, 200, 70000, 8589934592]' in line for line in lines)
    assert any('"id": 300' in line for line in lines)
