"""Structured output (``format``): every constrained output parses and validates, through the
native protocol; constrained and free sequences share a batch, the free ones unchanged; a
format that does not compile is refused naming its field, and the daemon goes on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest
from conftest import Daemon
from helpers import reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxd.client import AsyncClient, InvalidRequestError

PROMPT = "Answer in JSON:"


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    integers = st.tuples(st.integers(-1000, 1000), st.integers(0, 500)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}
    )
    numbers = st.tuples(st.integers(-50, 50), st.integers(1, 100)).map(
        lambda t: {"type": "number", "minimum": t[0], "maximum": t[0] + t[1]}
    )
    enums = st.lists(
        st.text("abcdefxyz", min_size=1, max_size=6), min_size=1, max_size=4, unique=True
    ).map(lambda values: {"enum": values})
    return st.one_of(integers, numbers, enums, st.just({"type": "boolean"}))


def _extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    arrays = st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}
    )
    objects = st.dictionaries(
        st.text("abcdefghij_", min_size=1, max_size=5), children, min_size=1, max_size=4
    ).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            }
        )
    )
    return st.one_of(arrays, objects)


SCHEMAS = st.recursive(_leaf(), _extend, max_leaves=8).map(
    # The top is an object, as OpenAI's json_schema requires.
    lambda s: (
        s
        if s.get("type") == "object"
        else {
            "type": "object",
            "properties": {"value": s},
            "required": ["value"],
            "additionalProperties": False,
        }
    )
)


def check(text: str, schema: dict[str, Any]) -> None:
    jsonschema.validate(json.loads(text), schema)


SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(schema=SCHEMAS)
def test_every_output_validates_against_its_generated_schema(
    daemon: Daemon, schema: dict[str, Any]
) -> None:
    """20 schemas, 10 sampled requests each, all at once: every output is valid."""
    fmt = {"type": "json_schema", "schema": schema}

    async def main() -> list[Any]:
        async with AsyncClient(daemon.socket) as client:
            results: list[Any] = [None] * 10

            async def one(i: int) -> None:
                results[i] = await client.generate(
                    PROMPT, format=fmt, max_tokens=400, temperature=1.0, seed=i, cache=False
                )

            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(one, i)
            return results

    for result in anyio.run(main):
        assert result.done.finish_reason == "stop", (schema, result.text)
        check(result.text, schema)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"enum": ["ada", "alan", "grace"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
FREE_PROMPTS = [f"# task {i}\n" + "def step(x):\n    return x + 1\n" * (i % 5) for i in range(8)]


async def test_constrained_and_free_sequences_share_a_batch(
    daemon: Daemon, tiny_model: Path
) -> None:
    """16 at once, half constrained: the free ones equal their solo runs token for token."""
    free: dict[int, list[int]] = {}
    constrained: dict[int, Any] = {}
    async with AsyncClient(daemon.socket) as client:
        before = await client.stats()

        async def run_free(i: int) -> None:
            result = await client.generate(FREE_PROMPTS[i], max_tokens=40, cache=False)
            free[i] = result.tokens

        async def run_constrained(i: int) -> None:
            constrained[i] = await client.generate(
                PROMPT,
                format={"type": "json_schema", "schema": PERSON},
                max_tokens=200,
                temperature=1.0,
                seed=i,
                cache=False,
            )

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(run_constrained, i)
                tg.start_soon(run_free, i)
        after = await client.stats()
    for i in range(8):
        assert free[i] == reference(tiny_model, FREE_PROMPTS[i], 40)[1], i
        assert constrained[i].done.finish_reason == "stop"
        check(constrained[i].text, PERSON)
    tokens = after.tokens_generated - before.tokens_generated
    steps = after.decode_steps - before.decode_steps
    assert tokens / steps > 2.0, (tokens, steps)  # really batched


@pytest.mark.parametrize(
    ("fmt", "field"),
    [
        ({"type": "json_schema", "schema": {"type": "nonsense"}}, "$.format.schema"),
        ({"type": "json_schema", "schema": {"$ref": "#/$defs/missing"}}, "$.format.schema"),
        ({"type": "regex", "pattern": "a(b"}, "$.format.pattern"),
        ({"type": "grammar", "lark": "start: undefined_rule"}, "$.format.lark"),
    ],
)
def test_a_format_that_does_not_compile_is_refused_naming_it(
    daemon: Daemon, fmt: dict[str, Any], field: str
) -> None:
    with daemon.client() as client:
        with pytest.raises(InvalidRequestError) as info:
            client.generate(PROMPT, format=fmt, max_tokens=8)
        assert info.value.field == field
        assert "cannot be compiled" in str(info.value)
        # The daemon goes on serving, constrained and free requests alike.
        ok = client.generate(PROMPT, format={"type": "regex", "pattern": "(yes|no)"}, max_tokens=8)
        assert ok.text in ("yes", "no") and ok.done.finish_reason == "stop"
        assert client.generate(PROMPT, max_tokens=4).done.finish_reason in ("stop", "length")


def test_regex_grammar_and_json_formats(daemon: Daemon) -> None:
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
    with daemon.client() as client:
        for seed in range(5):
            opts: dict[str, Any] = {"temperature": 1.0, "seed": seed, "max_tokens": 60}
            text = client.generate(
                PROMPT, format={"type": "regex", "pattern": r"[a-f]{2,5}-[0-9]{3}"}, **opts
            ).text
            assert re.fullmatch(r"[a-f]{2,5}-[0-9]{3}", text), text
            result = client.generate(PROMPT, format={"type": "grammar", "lark": lark}, **opts)
            if result.done.finish_reason == "stop":
                assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", result.text), result.text
        # Greedy any-JSON on the test model: an object, or cut off at max_tokens.
        result = client.generate(PROMPT, format={"type": "json"}, max_tokens=60)
        assert result.text.startswith("{")
        if result.done.finish_reason == "stop":
            assert isinstance(json.loads(result.text), dict)


def test_an_unknown_format_type_is_refused_naming_it(daemon: Daemon) -> None:
    with daemon.client() as client:
        with pytest.raises(InvalidRequestError) as info:
            client.generate(PROMPT, format={"type": "yaml"}, max_tokens=8)
        assert info.value.field == "$.format.type"


def test_each_distinct_format_is_compiled_once_per_model(tiny_model: Path) -> None:
    """In process, on the worker's own code: a repeated schema (keys in any order) is the
    compiled one, copied; each copy starts from the start."""
    from helpers import _load

    from mlxd.daemon.constraints import constraint_for, formats_of
    from mlxd.protocol import JsonSchemaFormat, RegexFormat

    model, tokenizer = _load(str(tiny_model))

    class Loaded:  # the two fields of LoadedModel the constraints read
        def __init__(self) -> None:
            self.tokenizer = tokenizer
            self.vocab_size = int(model.args.vocab_size)

    loaded: Any = Loaded()
    reordered = dict(reversed(list(PERSON.items())))
    first = constraint_for(JsonSchemaFormat(schema=PERSON), loaded)
    again = constraint_for(JsonSchemaFormat(schema=reordered), loaded)
    assert formats_of(loaded).compiles == 1
    constraint_for(RegexFormat(pattern="[ab]+"), loaded)
    assert formats_of(loaded).compiles == 2
    assert first is not None and again is not None and first is not again


def _batch_outputs(model: Any, tokenizer: Any, loaded: Any, pause_at: int) -> list[list[int]]:
    """Greedy tokens of 6 sequences in one ``BatchGenerator``, every other one constrained to
    PERSON; the first constrained one is taken out after its ``pause_at``-th token and put
    back after the next step, as the worker pauses a sequence (daemon/pausing.py)."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_logits_processors

    from mlxd.daemon.constraints import constraint_for
    from mlxd.daemon.pausing import put_back, take_out
    from mlxd.protocol import JsonSchemaFormat

    prompts = [tokenizer.encode(p) for p in FREE_PROMPTS[:6]]
    processors: list[list[Any]] = [
        [constraint_for(JsonSchemaFormat(schema=PERSON), loaded)] if i % 2 else []
        for i in range(len(prompts))
    ]
    # A bias (every even token down) before the constraint, and one on a free row: the
    # batch's mask must leave both working (mlx-lm still runs them, the constraint taken
    # out for the step).
    bias = make_logits_processors(logit_bias={t: -30.0 for t in range(0, loaded.vocab_size, 2)})
    processors[3] = [*bias, *processors[3]]
    processors[4] = bias
    generator = BatchGenerator(
        model,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        completion_batch_size=8,
        prefill_batch_size=2,  # joiners arrive over steps: rows move
    )
    uids = generator.insert(prompts, max_tokens=[40] * len(prompts), logits_processors=processors)
    owner = {uid: i for i, uid in enumerate(uids)}
    out: list[list[int]] = [[] for _ in prompts]
    ended: set[int] = set()
    held = None
    while len(ended) < len(prompts):
        if held is not None:
            (uid,) = [put_back(generator, held, 40 - len(out[1]), None, processors[1])]
            owner[uid], held = 1, None
        _, responses = generator.next()
        for r in responses:
            i = owner[r.uid]
            out[i].append(r.token)
            if r.finish_reason:
                ended.add(i)
            elif i == 1 and len(out[1]) == pause_at:
                held = take_out(generator, r.uid, None)
                assert held is not None
    generator.close()
    return out


def test_a_batch_masks_its_constrained_rows_at_once_as_each_row_alone_would(
    tiny_model: Path,
) -> None:
    """In process: daemon/batch_mask.py's one mask per step gives every row the tokens the
    per-row processors give (free rows unmasked, constrained ones valid), through a pause
    and resume that feeds a constrained row's last token again."""
    from helpers import _load

    from mlxd.daemon import batch_mask

    model, tokenizer = _load(str(tiny_model))

    class Loaded:
        def __init__(self) -> None:
            self.tokenizer = tokenizer
            self.vocab_size = int(model.args.vocab_size)

    loaded: Any = Loaded()
    try:
        batch_mask.enabled = False
        alone = _batch_outputs(model, tokenizer, loaded, pause_at=3)
        batch_mask.enabled = True
        before = dict(batch_mask.stats)
        together = _batch_outputs(model, tokenizer, loaded, pause_at=3)
    finally:
        batch_mask.enabled = True
    assert batch_mask.stats["rows"] - before["rows"] > 20  # the batch path masked them
    assert together == alone
    eos = set(tokenizer.eos_token_ids)
    for i in (1, 3, 5):
        check(tokenizer.decode([t for t in together[i] if t not in eos]), PERSON)
