"""Per-request sampling and stop strings, following mlx-lm's samplers and logits processors.

``make_sampling`` turns a ``Generate`` request into the sampler and logits processors that
mlx-lm's ``BatchGenerator`` takes per sequence; ``StopMatcher`` holds back streamed text
that could still be the start of a stop string, so stop text is never sent even when it
spans chunks.

The sampler is mlx-lm's ``make_sampler``, step for step, with one difference: its
``mx.compile``d steps take the request's temperature, top-p, min-p and XTC values as
arrays. mlx-lm passes them as Python floats, which ``mx.compile`` treats as constants:
every distinct value compiles anew (seconds of the worker's time on a CPU, which stalls
every stream) and stays in the compile cache for good, so a client varying them could
stall the daemon and grow its memory without end. Here each step compiles once per shape.

Threading: worker thread only (the samplers build MLX graphs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, greedy_sampler, make_logits_processors

from mlxd.protocol import Generate

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, step) pairs apart


class InvalidField(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _seeded(sampler: Sampler, seed: int) -> Sampler:
    """Reseed MLX's global generator before each draw from (seed, step).

    mlx-lm's samplers draw from the one global random state, which interleaved requests
    share; reseeding per step makes a seeded request's output independent of whatever else
    the worker runs between its steps.
    """
    return _Seeded(sampler, seed)


class _Seeded:
    __slots__ = ("sampler", "seed", "step")

    def __init__(self, sampler: Sampler, seed: int) -> None:
        self.sampler = sampler
        self.seed = seed
        self.step = 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        mx.random.seed((self.seed + self.step * _GOLDEN) % 2**64)
        self.step += 1
        return self.sampler(logprobs)

    def rewind(self) -> None:
        """Forget the last draw: a paused sequence's step-ahead token is drawn again when
        it resumes, and must be the same."""
        self.step -= 1


TRACES: dict[str, int] = {}
"""How often each compiled step was traced (compiled): once per shape, never per value."""


def _traced(name: str) -> None:
    # Runs only while mx.compile traces the function, not on each call.
    TRACES[name] = TRACES.get(name, 0) + 1


# The steps below are mlx-lm's (sample_utils.py), each scalar parameter an array input.
@partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
def _top_p(logprobs: mx.array, top_p: mx.array) -> mx.array:
    _traced("top_p")
    sorted_logprobs = mx.sort(logprobs, axis=-1)
    sorted_probs = mx.exp(sorted_logprobs.astype(mx.float32))
    mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
    total_mass = mass_above[..., :1] + sorted_probs[..., :1]
    num_dropped = (mass_above >= top_p * total_mass).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logprobs, num_dropped, axis=-1)
    return mx.where(logprobs < threshold, -float("inf"), logprobs)


@partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
def _min_p(logprobs: mx.array, log_min_p: mx.array) -> mx.array:
    _traced("min_p")
    top_logprobs = mx.max(logprobs, axis=-1, keepdims=True)
    return mx.where(logprobs < top_logprobs + log_min_p, -float("inf"), logprobs)


@partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
def _xtc(logits: mx.array, probability: mx.array, threshold: mx.array) -> mx.array:
    _traced("xtc")
    probs = mx.softmax(logits, -1)
    mask = probs > mx.where(probs > threshold, probs, mx.inf).min(axis=-1, keepdims=True)
    return mx.where(mx.random.uniform(0, 1) > probability, logits, mx.where(mask, -mx.inf, logits))


@partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
def _categorical(logits: mx.array, inverse_temp: mx.array) -> mx.array:
    _traced("categorical")
    return mx.random.categorical(logits * inverse_temp)


def _make_sampler(req: Generate, vocab_size: int) -> Sampler:
    """mlx-lm's ``make_sampler(temp, top_p, min_p, 1, top_k, xtc_probability, xtc_threshold)``."""
    temp, top_p, min_p = req.temperature, req.top_p, req.min_p
    if temp == 0:
        return greedy_sampler  # one shared function: the batch samples its greedy rows at once
    # Top-k of the whole vocabulary keeps every token; mlx-lm raises at the first step
    # instead, which fails every sequence of the batch.
    top_k = req.top_k if req.top_k < vocab_size else 0
    xtc_probability, xtc_threshold = req.xtc_probability, req.xtc_threshold

    def sample(logprobs: mx.array) -> mx.array:
        # Each parameter in the dtype a Python float would take in mlx-lm's arithmetic.
        dtype = logprobs.dtype
        if 0 < top_p < 1.0:
            logprobs = _top_p(logprobs, mx.array(top_p, mx.float32))
        if min_p != 0.0:
            logprobs = _min_p(logprobs, mx.array(math.log(min_p), dtype))
        if xtc_probability > 0.0:
            logprobs = _xtc(
                logprobs, mx.array(xtc_probability, mx.float32), mx.array(xtc_threshold, dtype)
            )
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        return _categorical(logprobs, mx.array(1.0 / temp, dtype))

    return sample


def make_sampling(req: Generate, vocab_size: int) -> tuple[Sampler, list[LogitsProcessor]]:
    """The sampler and logits processors for ``req`` (mlx-lm's, seeded per request)."""
    if req.logit_bias:
        for token in req.logit_bias:
            if token >= vocab_size:
                raise InvalidField(
                    "$.logit_bias",
                    f"token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                )
    sampler = _make_sampler(req, vocab_size)
    if req.seed is not None and req.temperature > 0:
        sampler = _seeded(sampler, req.seed)
    processors = make_logits_processors(
        logit_bias=req.logit_bias,
        repetition_penalty=req.repetition_penalty,
        repetition_context_size=req.repetition_context_size,
    )
    return sampler, processors


class StopMatcher:
    """Finds stop strings in streamed text and holds back text that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._held = ""
        self.matched: str | None = None
        """The stop string that ended the output (the earliest in the text), once found."""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text now safe to release, and whether a stop string was found (output ends there)."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        hits = [(i, s) for s in self._stops if (i := buffer.find(s)) >= 0]
        if hits:
            self._held = ""
            at, self.matched = min(hits, key=lambda hit: hit[0])
            return buffer[:at], True
        keep = max((self._partial_suffix(buffer, s) for s in self._stops), default=0)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    @staticmethod
    def _partial_suffix(buffer: str, stop: str) -> int:
        """Length of the longest end of ``buffer`` that is a proper start of ``stop``."""
        for k in range(min(len(stop) - 1, len(buffer)), 0, -1):
            if buffer.endswith(stop[:k]):
                return k
        return 0
