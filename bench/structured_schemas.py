"""bench/structured.py's schemas, and their compile time.

The schemas: ``SCHEMAS``, closed objects (``additionalProperties: false``, required fields)
of enums, bounded integers and numbers, bounded arrays and a nested object, that finish on
random weights; ``RECORDS``, one that never does within a benchmark's ``max_tokens``.

Compile time, two ways: (a) in this process, llguidance compiling each schema for the
same tokenizer the daemon builds (daemon/constraints.py: ``grammar_from_json_schema``, then
``LLMatcher``), and its first mask, in ms; (b) on the daemon, a request (``max_tokens`` 1)
with a schema it has not seen (each made new by a ``description``) vs the same schema
again, time to first token; the difference is the daemon's compile.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from clients import Prompts, mlxd_request, run


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required if required is not None else sorted(properties),
        "additionalProperties": False,
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "person (enum, integer, array)": _closed(
        {
            "name": {"enum": ["ada", "alan", "grace"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        },
        ["name", "age"],
    ),
    "order (nested object, bounded array)": _closed(
        {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "customer": _closed(
                {
                    "tier": {"enum": ["free", "pro", "team"]},
                    "active": {"type": "boolean"},
                }
            ),
            "items": {
                "type": "array",
                "items": _closed(
                    {
                        "sku": {"enum": ["a1", "b2", "c3", "d4"]},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    }
                ),
                "minItems": 1,
                "maxItems": 3,
            },
        }
    ),
    "reading (bounded numbers)": _closed(
        {
            "sensor": {"enum": ["temp", "humidity", "pressure"]},
            "value": {"type": "number", "minimum": -40, "maximum": 60},
            "quality": {"type": "integer", "minimum": 0, "maximum": 5},
            "calibrated": {"type": "boolean"},
        }
    ),
    "config (enums)": _closed(
        {
            "mode": {"enum": ["fast", "safe", "debug"]},
            "level": {"enum": [1, 2, 3]},
            "color": {"enum": ["red", "green", "blue", "none"]},
            "retries": {"type": "integer", "minimum": 0, "maximum": 5},
        }
    ),
}
NAMES = list(SCHEMAS)
RECORDS: dict[str, Any] = _closed(
    {
        "records": {
            "type": "array",
            "items": _closed(
                {
                    "id": {"type": "integer", "minimum": 0, "maximum": 99999},
                    "tier": {"enum": ["free", "pro", "team"]},
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                    "active": {"type": "boolean"},
                }
            ),
            "minItems": 1000,
        }
    }
)
"""The headline's schema: no output completes it within any ``max_tokens`` here."""
ALL_SCHEMAS = {**SCHEMAS, "records (minItems 1000: never completes)": RECORDS}


def fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "schema": schema}


def compile_in_process(model_dir: Path, schemas: dict[str, Any], repeats: int) -> dict[str, Any]:
    """llguidance compiling each schema for the daemon's tokenizer, as constraints.py does."""
    import llguidance
    import llguidance.hf
    import numpy as np
    from mlx_lm import load

    from mlxd.daemon.constraints import _JSON_OPTIONS

    _, tokenizer = load(str(model_dir))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(
        tokenizer._tokenizer, n_vocab=vocab, eos_token=sorted(tokenizer.eos_token_ids)
    )
    tokenizer_ms = (time.perf_counter() - start) * 1000
    out: dict[str, Any] = {"tokenizer_ms": tokenizer_ms, "schemas": {}}
    for name, schema in schemas.items():
        compiles, masks = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            text = json.dumps(schema, sort_keys=True)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
            matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
            t1 = time.perf_counter()
            assert not matcher.is_error(), matcher.get_error()
            np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
            t2 = time.perf_counter()
            compiles.append((t1 - t0) * 1000)
            masks.append((t2 - t1) * 1000)
        out["schemas"][name] = {
            "compile_ms": statistics.median(compiles),
            "first_mask_ms": statistics.median(masks),
        }
    return out


async def _ttft(sock: Path, prompt: str, schema: dict[str, Any]) -> float:
    from mlxd.client import AsyncClient

    async with AsyncClient(sock, name="bench-compile") as client:
        reply = await mlxd_request(client, prompt, 1, cache=False, format=fmt(schema))
    return reply.ttft_s


def compile_on_daemon(
    sock: Path, prompts: Prompts, schemas: dict[str, Any], repeats: int
) -> dict[str, Any]:
    """TTFT with a schema the daemon has not seen vs the same schema again."""
    out: dict[str, Any] = {}
    tag = time.time_ns()  # new schemas even for a daemon that outlived an earlier run
    for name, schema in schemas.items():
        firsts, agains = [], []
        for i in range(repeats):
            new = {**schema, "description": f"bench {tag} {i}"}
            firsts.append(run(_ttft(sock, prompts.short(), new)))
            agains.append(run(_ttft(sock, prompts.short(), new)))
        out[name] = {
            "first_ttft_ms": statistics.median(firsts) * 1000,
            "again_ttft_ms": statistics.median(agains) * 1000,
            "compile_ms": statistics.median(a - b for a, b in zip(firsts, agains, strict=True))
            * 1000,
        }
    return out
