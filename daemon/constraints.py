"""Structured output: a request's ``format`` as a per-sequence logits mask (llguidance).

``constraint_for`` compiles a ``Generate.format`` (JSON, a JSON Schema, a regular
expression or a Lark grammar) for a model's tokenizer and returns a logits processor, the
same kind mlx-lm's ``generate_step`` and ``BatchGenerator`` take per sequence for penalties:
so constrained and free sequences share one batch, and a free one's tokens are exactly
what they would be alone. A format that does not compile is refused with ``InvalidField``
naming it, at intake, before the request takes a place in a batch.

The engine is llguidance (the one llama.cpp and vLLM use): wheels for macOS arm64 and Linux
x86_64, masks in tens of microseconds per token from a lazily built lexer/parser rather than
a whole-vocabulary automaton built up front, and tokenizers taken straight from HF
``tokenizers`` (what mlx-lm loads). Each distinct format is compiled once per model and
kept (an LRU of matchers in their start state, copied per request).

JSON is generated compact (no whitespace between tokens): a model that may emit
whitespace forever would otherwise never finish the value.

Threading: worker thread only (the processors build MLX graphs; the caches are unlocked).
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

from mlxd.protocol import Format, GrammarFormat, JsonFormat, JsonSchemaFormat, RegexFormat

from .models import LoadedModel
from .sampling import InvalidField

MAX_FORMATS_PER_MODEL = 64
"""Compiled formats kept per model; the least recently used goes first."""

_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
_MAX_ERROR_CHARS = 600


class _ModelFormats:
    """One model's llguidance tokenizer and its compiled formats."""

    def __init__(self, loaded: LoadedModel) -> None:
        tokenizer = loaded.tokenizer
        eos = sorted(tokenizer.eos_token_ids)
        self.vocab_size = loaded.vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(
            tokenizer._tokenizer, n_vocab=loaded.vocab_size, eos_token=eos
        )
        self.eos = eos
        self.compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.compiles = 0
        """How many formats were compiled (not taken from ``compiled``): tests read it."""

    def matcher(self, grammar: str, field: str, what: str) -> llguidance.LLMatcher:
        template = self.compiled.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            self.compiles += 1
            if template.is_error():
                error = template.get_error().strip()
                if len(error) > _MAX_ERROR_CHARS:
                    error = error[:_MAX_ERROR_CHARS] + "..."
                raise InvalidField(field, f"{what} cannot be compiled: {error}")
            self.compiled[grammar] = template
            if len(self.compiled) > MAX_FORMATS_PER_MODEL:
                self.compiled.popitem(last=False)
        else:
            self.compiled.move_to_end(grammar)
        return template.deep_copy()


_MODELS: weakref.WeakKeyDictionary[LoadedModel, _ModelFormats] = weakref.WeakKeyDictionary()


def formats_of(loaded: LoadedModel) -> _ModelFormats:
    formats = _MODELS.get(loaded)
    if formats is None:
        formats = _MODELS[loaded] = _ModelFormats(loaded)
    return formats


def _grammar(fmt: Format) -> tuple[str, str, str]:
    """(llguidance grammar, the field to name if it fails, what it is) for ``fmt``."""
    if isinstance(fmt, JsonFormat):
        schema: Any = {"type": "object"}
        return _json_grammar(schema, "$.format"), "$.format", "the JSON format"
    if isinstance(fmt, JsonSchemaFormat):
        field = "$.format.schema"
        return _json_grammar(fmt.schema, field), field, "the JSON schema"
    if isinstance(fmt, RegexFormat):
        grammar = llguidance.LLMatcher.grammar_from_regex(fmt.pattern)
        return grammar, "$.format.pattern", "the regular expression"
    assert isinstance(fmt, GrammarFormat)
    return llguidance.LLMatcher.grammar_from_lark(fmt.lark), "$.format.lark", "the grammar"


def _json_grammar(schema: Any, field: str) -> str:
    try:
        text = json.dumps(schema, sort_keys=True, allow_nan=False)
        return llguidance.LLMatcher.grammar_from_json_schema(text, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise InvalidField(field, f"the JSON schema cannot be compiled: {exc}") from None


def constraint_for(fmt: Format | None, loaded: LoadedModel) -> Constraint | None:
    """The logits processor enforcing ``fmt`` on ``loaded``'s output (None: no format);
    raises ``InvalidField`` for a format that does not compile."""
    if fmt is None:
        return None
    from . import batch_mask  # imports this module

    batch_mask.install()  # once: the batch's constraints as one mask per step
    formats = formats_of(loaded)
    grammar, field, what = _grammar(fmt)
    return Constraint(formats.matcher(grammar, field, what), formats.vocab_size, formats.eos)


class Constraint:
    """A logits processor: -inf for every token the format does not allow next.

    mlx-lm calls it with the sequence's whole context (prompt, then generated tokens) each
    step, one token longer than the last time. Its first call sees the prompt alone; each
    later one brings the token sampled from the previous mask, which the matcher consumes
    then. A paused sequence (daemon/pausing.py) resumes one token back, fed again: the
    context is as long as the last time, so nothing is consumed twice; a shorter context
    rolls the matcher back.

    In a ``BatchGenerator`` step, daemon/batch_mask.py does this for all the batch's
    constraints at once (one wait for the sampled tokens, one mask), through
    ``steps_to`` and ``advance``, instead of calling it.
    """

    __slots__ = ("_consumed", "_eos", "_matcher", "_start", "_vocab")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos: list[int]) -> None:
        self._matcher = matcher
        self._vocab = vocab_size
        self._eos = eos
        self._start: int | None = None
        self._consumed = 0

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def steps_to(self, n: int) -> int:
        """Tokens a context of ``n`` brings that the matcher has not consumed (negative:
        it must roll back); 0 on the first call."""
        return 0 if self._start is None else n - self._start - self._consumed

    def advance(self, n: int, new: list[int]) -> llguidance.LLMatcher | None:
        """Bring the matcher to a context of ``n`` tokens whose unconsumed ones are ``new``
        (``steps_to(n)`` of them, or none to roll back); the matcher, or None if it is in
        error (never expected: every token came from the mask)."""
        if self._start is None:
            self._start = n
        generated = n - self._start
        matcher = self._matcher
        if generated < self._consumed:
            matcher.rollback(self._consumed - generated)
        elif new:
            matcher.consume_tokens(new)
        self._consumed = generated
        return None if matcher.is_error() else matcher

    def eos_only(self, width: int) -> np.ndarray:
        allowed = np.zeros(width, dtype=np.bool_)
        allowed[[t for t in self._eos if t < width]] = True
        return allowed

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = tokens.shape[-1]
        ahead = self.steps_to(n)
        new = tokens[n - ahead :].tolist() if ahead > 0 else []
        matcher = self.advance(n, new)
        width = logits.shape[-1]
        if matcher is None:  # end the output cleanly
            allowed = self.eos_only(width)
        else:
            bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(bits, bitorder="little")[:width].astype(np.bool_)
            if allowed.shape[0] < width:  # logits wider than the tokenizer: padding rows
                allowed = np.concatenate([allowed, np.zeros(width - allowed.shape[0], np.bool_)])
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, logits.dtype))
