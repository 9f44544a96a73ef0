"""``SoloGenerator``: one sequence on mlx-lm's ``generate_step``, behind the subset of
``BatchGenerator``'s interface the worker uses (``insert``, ``next``, ``remove``,
``close``).

Why: a batch of one still pays ``BatchGenerator``'s per-step bookkeeping (about 4% of
single-stream decode speed on a small model, measured in bench/single_stream.py), and a
lone sequence (the common case on a laptop) should run as fast as ``mlx_lm.generate``.
The worker starts a model's first sequence here; sequences that arrive while it runs join
the model's ``BatchGenerator``. Both yield exactly ``mlx_lm.generate``'s tokens. A model
with ``kv_bits`` runs quantized here (``generate_step``'s ``kv_bits``, from the first
token), as does a state the prompt cache stored quantized.

Threading: worker thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from .kv_quant import bits_of
from .speculative import Speculation, can_speculate, draft_step, lookup_step


@dataclass
class SoloResponse:
    """The fields of ``GenerationBatch.Response`` the worker reads."""

    uid: int
    token: int
    finish_reason: str | None
    prompt_cache: list[Any] | None
    all_tokens: list[int] | None
    logprobs: mx.array | None = None
    """The log-probabilities the token was sampled from (daemon/logprobs.py)."""


class SoloGenerator:
    def __init__(
        self,
        model: Any,
        eos: frozenset[int],
        prefill_step_size: int = 512,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ) -> None:
        self._model = model
        self._kv = (kv_bits, kv_group_size)
        """Quantized KV from the first token (the model's ``kv_bits``; daemon/kv_quant.py)."""
        self._prefill_step_size = prefill_step_size
        self._eos = eos
        self._steps: Any = None
        self._state: list[Any] = []
        self._tokens: list[int] = []
        self._max_tokens = 0
        self._generated = 0
        self.speculation: Speculation | None = None
        """Set before ``insert`` to decode speculatively (daemon/speculative.py)."""

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        caches: list[list[Any] | None],
        all_tokens: list[list[int]],
        samplers: list[Callable[[mx.array], mx.array]],
        logits_processors: list[list[Callable[[mx.array, mx.array], mx.array]]],
    ) -> list[int]:
        (prompt,), (context,) = prompts, all_tokens
        self._state = caches[0] if caches[0] is not None else make_prompt_cache(self._model)
        self._tokens = [*context, *prompt]
        self._max_tokens = max_tokens[0]
        raw = processors = logits_processors[0]
        # A state taken quantized from the prompt cache goes on quantized, as it was stored.
        kv_bits, kv_group_size = bits_of(self._state) or self._kv
        if context and processors:
            prefix = mx.array(context)
            processors = [_with_context(p, prefix) for p in processors]
        spec = self.speculation
        # Quantized KV goes through generate_step, which quantizes as mlx-lm does.
        if spec is not None and kv_bits is None and can_speculate(spec, self._state):
            common = {
                "context": list(context),
                "state": self._state,
                "spec": spec,
                "sampler": samplers[0],
                "prefill_step_size": self._prefill_step_size,
                "max_tokens": self._max_tokens,
            }
            if spec.mode == "prompt_lookup":
                # It gives the processors the whole context itself.
                self._steps = lookup_step(list(prompt), self._model, processors=raw, **common)
            else:
                self._steps = draft_step(list(prompt), self._model, processors=processors, **common)
            return [0]
        self._steps = generate_step(
            mx.array(prompt),
            self._model,
            max_tokens=self._max_tokens,
            sampler=samplers[0],
            logits_processors=processors,
            prompt_cache=self._state,
            prefill_step_size=self._prefill_step_size,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            quantized_kv_start=0,
        )
        return [0]

    @property
    def state(self) -> list[Any]:
        """The live KV state: it only grows past the prompt, so its prefix can be forked."""
        return self._state

    def next(self) -> tuple[list[Any], list[SoloResponse]]:
        token, logprobs, *_ = next(self._steps)
        self._tokens.append(token)
        self._generated += 1
        finish = None
        if token in self._eos:
            finish = "stop"
        elif self._generated >= self._max_tokens:
            finish = "length"
        if finish is None:
            return [], [SoloResponse(0, token, None, None, None, logprobs)]
        self.close()
        return [], [SoloResponse(0, token, finish, self._state, self._tokens, logprobs)]

    def remove(
        self, uids: list[int], return_prompt_caches: bool = False
    ) -> dict[int, tuple[list[Any], list[int]]]:
        self.close()
        return {0: (self._state, self._tokens)} if return_prompt_caches else {}

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()


def _with_context(processor: Any, prefix: mx.array) -> Any:
    """mlx-lm's processors see only the tokens ``generate_step`` is given: put the cached
    part of the prompt back in front, so penalties remember it."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return processor(mx.concatenate([prefix, tokens]), logits)

    return process
