"""What a ``generate`` may ask for beyond sampling, and the per-token records it gets back.

The wire types that came with structured output, logprobs and reasoning: the output
``Format`` (a tagged union on ``type``), ``ReasoningEffort``, and the ``TokenLogprob``\\s a
chunk carries when asked. protocol/messages.py builds ``Generate`` and ``Chunk`` from them;
both modules are the one wire contract, re-exported whole by ``mlxd.protocol``.

Threading: pure data; safe from any thread.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from msgspec import Meta, Struct

MAX_TOP_LOGPROBS = 20
"""Alternatives per token a ``generate`` may ask for (OpenAI's limit too)."""

Bytes = bytes  # a field named ``bytes`` would shadow the type in its Struct's annotations

ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]

SpeculativeMode = Literal["off", "prompt_lookup", "draft"]
"""How a lone sequence speculates (daemon/speculative.py): not at all, with proposals from
its own text (prompt lookup), or from the model's configured draft model."""


class _Format(Struct, tag_field="type", kw_only=True):
    """Base for ``Generate.format``: what the output must match, tagged by ``type``."""


class JsonFormat(_Format, tag="json"):
    """Any JSON object (OpenAI's ``json_object``, Ollama's ``"json"``)."""


class JsonSchemaFormat(_Format, tag="json_schema"):
    """A JSON value valid against ``schema`` (a JSON Schema)."""

    schema: dict[str, Any]


class RegexFormat(_Format, tag="regex"):
    """Text that matches ``pattern`` in full."""

    pattern: Annotated[str, Meta(min_length=1, max_length=65536)]


class GrammarFormat(_Format, tag="grammar"):
    """Text in the language of ``lark``, a Lark grammar (llguidance's dialect)."""

    lark: Annotated[str, Meta(min_length=1, max_length=262144)]


Format = Union[JsonFormat, JsonSchemaFormat, RegexFormat, GrammarFormat]  # noqa: UP007


class TopLogprob(Struct, kw_only=True):
    """A candidate token at one step: its id, log-probability and bytes."""

    token: int
    logprob: float
    bytes: Bytes


class TokenLogprob(Struct, kw_only=True):
    """A generated token's log-probability in the distribution it was sampled from, and the
    ``top_logprobs`` most likely tokens of that distribution (most likely first)."""

    token: int
    logprob: float
    bytes: Bytes
    top_logprobs: list[TopLogprob] = []


__all__ = [
    "MAX_TOP_LOGPROBS",
    "Format",
    "GrammarFormat",
    "JsonFormat",
    "JsonSchemaFormat",
    "RegexFormat",
    "SpeculativeMode",
    "TokenLogprob",
    "TopLogprob",
]
