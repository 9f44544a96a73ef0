"""Per-request sampling and stop strings, built on mlx-lm's samplers and logits processors.

``make_sampling`` turns a ``Generate`` request into the sampler and logits processors that
mlx-lm's ``BatchGenerator`` takes per sequence; ``StopMatcher`` holds back streamed text
that could still be the start of a stop string, so stop text is never sent even when it
spans chunks.

Threading: worker thread only (the samplers build MLX graphs).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

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
    step = 0

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal step
        mx.random.seed((seed + step * _GOLDEN) % 2**64)
        step += 1
        return sampler(logprobs)

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
    sampler = make_sampler(
        temp=req.temperature,
        top_p=req.top_p,
        min_p=req.min_p,
        top_k=req.top_k,
        xtc_probability=req.xtc_probability,
        xtc_threshold=req.xtc_threshold,
    )
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

    def feed(self, text: str) -> tuple[str, bool]:
        """Text now safe to release, and whether a stop string was found (output ends there)."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
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
