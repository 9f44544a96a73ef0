"""Speculative decoding for a lone sequence: tokens proposed cheaply, then checked by the
model in one forward pass, so that a pass yields several tokens where they were right.

Two ways to propose (``Generate.speculative``):

- ``prompt_lookup``: the tokens that followed the latest earlier occurrence of the text's
  last few tokens (an n-gram, longest first), in the prompt or the output so far. Nothing
  is computed to propose them; made for completions and edits that copy their context.
- ``draft``: a small model with the same vocabulary, named per model in the
  configuration; mlx-lm's own ``speculative_generate_step`` runs it.

Verification is mlx-lm's: the model runs over the last token and the k proposals at once;
each of the k + 1 positions gets its token sampled from the model's own distribution there
(the request's logits processors, then its sampler), and the proposals are accepted while
they equal what was sampled; the first sampled token that differs is kept too. So greedy
output is plain decoding's, token for token (barring the float rounding of a k + 1 token
pass against a 1 token one: the same arithmetic on a longer input), and at temperature
> 0 every token is drawn from the distribution plain decoding would draw it from: only
which random draws are used differs.

The cache must be trimmable (rejected proposals are cut off again): plain and quantized
KV. A sequence runs speculatively only while it is its model's only one (daemon/solo.py);
in a batch it decodes plainly.

Threading: worker thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import speculative_generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from mlxd.protocol import Generate, SpeculativeUse

from .model_options import NUM_DRAFT_TOKENS
from .sampling import InvalidField

MAX_NGRAM = 4
"""The longest suffix prompt lookup matches (then shorter, down to one token)."""

Step = Generator[tuple[int, mx.array, bool], None, None]


@dataclass
class Speculation:
    """How a solo sequence speculates, and what it did: proposals made and accepted."""

    mode: str
    draft_model: Any = None
    num_draft_tokens: int = NUM_DRAFT_TOKENS
    drafted: int = 0
    accepted: int = 0

    def use(self) -> SpeculativeUse:
        return SpeculativeUse(mode=self.mode, drafted=self.drafted, accepted=self.accepted)


def speculation_for(
    req: Generate, loaded: Any, *, constrained: bool, warm: bool
) -> Speculation | None:
    """How ``req`` speculates on ``loaded`` (its own ``speculative``, else the model's
    configured mode); None: not at all (a warm-up never does). Raises ``InvalidField`` for
    ``draft`` on a model with no draft model. A constrained request (``format``, a forced
    tool call) decodes plainly, reported with nothing drafted: a rejected proposal would
    have to be taken back out of its constraint's parser."""
    mode = req.speculative or loaded.speculative or "off"
    if mode == "off" or warm:
        return None
    if mode == "draft" and loaded.draft is None:
        raise InvalidField(
            "$.speculative",
            f"model {loaded.name!r} has no draft model (model_options.{loaded.name}.draft)",
        )
    draft = loaded.draft if mode == "draft" else None
    return Speculation(mode, draft, 0 if constrained else loaded.num_draft_tokens)


def can_speculate(spec: Speculation | None, state: list[Any]) -> bool:
    return spec is not None and spec.num_draft_tokens > 0 and can_trim_prompt_cache(state)


class NgramIndex:
    """Where each n-gram (1 to ``max_ngram`` tokens) of a growing token list last occurred
    with a token after it: prompt lookup's proposals, found in constant time per pass
    rather than by a scan of the whole context."""

    def __init__(self, tokens: Sequence[int], max_ngram: int = MAX_NGRAM) -> None:
        self.tokens: list[int] = []
        self._max = max_ngram
        self._after: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        self.extend(tokens)

    def extend(self, new: Sequence[int]) -> None:
        tokens, after = self.tokens, self._after
        for token in new:
            end = len(tokens)  # the n-grams ending here are followed by ``token``
            tokens.append(token)
            for n in range(1, min(self._max, end) + 1):
                after[n][tuple(tokens[end - n : end])] = end

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest
        suffix that occurred before."""
        tokens = self.tokens
        if k <= 0:
            return []
        for n in range(min(self._max, len(tokens) - 1), 0, -1):
            start = self._after[n].get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []


def propose(tokens: Sequence[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """``NgramIndex(tokens).propose(k)``: what prompt lookup proposes after ``tokens``."""
    return NgramIndex(tokens, max_ngram).propose(k)


def _sample(
    logits: mx.array,
    context: list[int],
    proposals: list[int],
    sampler: Callable[[mx.array], mx.array],
    processors: Sequence[Any],
) -> tuple[mx.array, mx.array]:
    """The token sampled at each of the pass's positions, and its log-probabilities: each
    row processed with the context it follows, as plain decoding would have it."""
    if not processors:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs
    rows, chosen = [], []
    for i in range(logits.shape[0]):
        row = logits[i : i + 1]
        seen = mx.array(context + proposals[:i])
        for processor in processors:
            row = processor(seen, row)
        logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
        chosen.append(sampler(logprobs))
        rows.append(logprobs)
    return mx.concatenate(chosen), mx.concatenate(rows)


def lookup_step(
    prompt: list[int],
    model: Any,
    *,
    context: list[int],
    state: list[Any],
    spec: Speculation,
    sampler: Callable[[mx.array], mx.array],
    processors: Sequence[Any],
    prefill_step_size: int,
    max_tokens: int,
) -> Step:
    """Prompt-lookup decoding of ``prompt`` (``context``: the cached tokens before it,
    already in ``state``): yields (token, logprobs, proposed) as ``generate_step`` does,
    ``max_tokens`` of them at most (never a proposal past them: the state stays within
    what the sequence was charged for)."""
    index = NgramIndex([*context, *prompt])
    tokens = index.tokens
    y = prompt
    while len(y) > 1:  # the prompt but its last token, as generate_step prefills it
        n = min(prefill_step_size, len(y) - 1)
        model(mx.array(y[:n])[None], cache=state)
        mx.eval([c.state for c in state])
        y = y[n:]
        mx.clear_cache()
    produced, k = 0, spec.num_draft_tokens
    while produced < max_tokens:
        proposals = index.propose(min(k, max_tokens - produced - 1))
        logits = model(mx.array(y + proposals)[None], cache=state)[0, -(len(proposals) + 1) :]
        sampled, logprobs = _sample(logits, tokens, proposals, sampler, processors)
        out = sampled.tolist()
        accepted = 0
        while accepted < len(proposals) and out[accepted] == proposals[accepted]:
            accepted += 1
        spec.drafted += len(proposals)
        spec.accepted += accepted
        # Propose as far as the last pass got right, and one more: a wrong run costs the
        # pass its length, a right one saves as many passes.
        if proposals:
            k = min(spec.num_draft_tokens, accepted + 1 if accepted < len(proposals) else k + 1)
        # The state holds y and every proposal; keep y and the accepted ones.
        trim_prompt_cache(state, len(proposals) - accepted)
        kept = out[: accepted + 1]
        index.extend(kept)
        produced += len(kept)
        y = kept[-1:]
        for i, token in enumerate(kept):
            yield token, logprobs[i], i < accepted


def draft_step(
    prompt: list[int],
    model: Any,
    *,
    context: list[int],
    state: list[Any],
    spec: Speculation,
    sampler: Callable[[mx.array], mx.array],
    processors: Sequence[Any],
    prefill_step_size: int,
    max_tokens: int,
) -> Step:
    """Draft-model decoding with mlx-lm's ``speculative_generate_step``. The draft's own
    cache starts with ``context`` too (the target's comes from the prompt cache, which keeps
    no draft state), then follows the target's."""
    draft = spec.draft_model
    draft_state = make_prompt_cache(draft)
    for start in range(0, len(context), prefill_step_size):
        draft(mx.array(context[start : start + prefill_step_size])[None], cache=draft_state)
        mx.eval([c.state for c in draft_state])
    k = spec.num_draft_tokens
    steps = speculative_generate_step(
        mx.array(prompt),
        model,
        draft,
        num_draft_tokens=k,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=list(processors) or None,
        prompt_cache=[*state, *draft_state],
        prefill_step_size=prefill_step_size,
    )
    fresh = True
    for produced, (token, logprobs, proposed) in enumerate(steps):
        if fresh:  # a pass begins: mlx-lm drafted min(k, what max_tokens leaves)
            spec.drafted += min(k, max_tokens - produced)
        fresh = not proposed  # the target's own token ends the pass
        spec.accepted += proposed
        yield token, logprobs, proposed
