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


# ---------------------------------------------------------------- the doc's words vs the code

ROOT = DOCS.parent


def _section(doc: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of its level or above."""
    level = heading.split(" ")[0]
    start = doc.index(f"\n{heading}\n") + len(heading) + 2
    ends = [doc.find(f"\n{'#' * n} ", start) for n in range(1, len(level) + 1)]
    return doc[start : min([e for e in ends if e >= 0] or [len(doc)])]


def _first_column(table_text: str) -> set[str]:
    """The backticked codes heading each row of the tables in ``table_text``."""
    return set(re.findall(r"^\| `(\w+)`", table_text, re.MULTILINE))


def test_the_error_table_lists_exactly_the_wire_codes() -> None:
    from mlxd.protocol import errors

    errors_section = _section((DOCS / "PROTOCOL.md").read_text(), "## Errors")
    wire = errors_section.split("### ")[0]
    assert _first_column(wire) - {"code", "message", "id", "field"} == errors.ALL_CODES


def _codes_raised_outside_the_wire() -> set[str]:
    """Codes the Python client raises and the CLI prints, read from their sources."""
    codes: set[str] = set()
    for path in [*(ROOT / "clients" / "python").glob("*.py"), *(ROOT / "daemon").glob("cli*.py")]:
        text = path.read_text()
        codes |= set(re.findall(r"Error\(\s*\"(\w+)\"", text))
        codes |= set(re.findall(r"mlxd: error: ([a-z_]+):", text))
    codes |= set(
        re.findall(r"ServiceError\(\s*\"(\w+)\"", (ROOT / "daemon/service.py").read_text())
    )
    hub = (ROOT / "daemon/hub.py").read_text()
    codes |= set(re.findall(r"HubError\(\s*\"(\w+)\"", hub))
    codes |= set(re.findall(r"code, why = \"(\w+)\"", hub))
    return codes


def test_codes_that_never_come_over_the_wire_are_documented_as_such() -> None:
    from mlxd.protocol import errors

    doc = (DOCS / "PROTOCOL.md").read_text()
    outside = _first_column(_section(doc, "### Codes that never come over the wire"))
    raised = _codes_raised_outside_the_wire()
    assert raised - errors.ALL_CODES <= outside, "undocumented client or CLI codes"
    assert outside - {"code"} <= raised, "documented codes nothing raises"
    assert {"daemon_unavailable", "connection_closed", "already_running", "invalid_config",
            "command_failed"} <= outside  # fmt: skip


def test_the_hello_table_states_the_client_name_limit() -> None:
    import msgspec

    (client,) = [f for f in msgspec.inspect.type_info(Hello).fields if f.name == "client"]
    limit = client.type.max_length
    handshake = _section((DOCS / "PROTOCOL.md").read_text(), "## Handshake")
    row = next(line for line in handshake.splitlines() if line.startswith("| `client`"))
    assert f"at most {limit} characters" in row, row


def test_line_counts_the_doc_gives_for_the_clients_are_true() -> None:
    doc = (DOCS / "PROTOCOL.md").read_text().replace("\n", " ")
    claims = re.findall(r"`(clients/[^`]+)`[^`]*? in about (\d+) lines", doc)
    assert claims, "no line counts left to check"
    for path, stated in claims:
        files = [ROOT / path] if (ROOT / path).is_file() else list((ROOT / path).rglob("*.py"))
        lines = sum(len(f.read_text().splitlines()) for f in files)
        assert abs(lines - int(stated)) <= 0.1 * lines, (path, stated, lines)


def test_the_stats_keys_are_documented_where_they_sit() -> None:
    from mlxd.protocol import CacheStats, MemoryStats, ServerStats

    stats = _section((DOCS / "PROTOCOL.md").read_text(), "### `stats`")
    paragraphs = stats.split("\n\n")
    for struct, lead in ((ServerStats, "`stats`:"), (CacheStats, "`stats.cache`"),
                         (MemoryStats, "`stats.memory`")):  # fmt: skip
        (para,) = [p for p in paragraphs if p.startswith(lead)]
        named = set(re.findall(r"`(\w+)`", para))
        assert set(struct.__struct_fields__) <= named, (lead, set(struct.__struct_fields__) - named)
