"""Pausing a running sequence: taking it out of its generator with everything needed to go
on later exactly where it was, and putting it back.

A connection whose replies pile up unread (the loop tells the worker: ``Worker.pause``)
must not keep batch places others wait for. Its running sequences leave their batch; what
they hold is their KV state and the tokens in it. Both of mlx-lm's generators run one step
ahead: when token ``t`` has been streamed, ``t`` is already in the KV state and the next
token has been sampled from its logits. That sample is lost with the batch, so the state is
trimmed back by one token and ``t`` is fed again on resume, which samples the same next
token (a seeded sampler is rewound by its one lost draw). The sequence's detokenizer, stop
matcher, completion count and timings stay on its ``Sequence`` (daemon/sequences.py),
untouched.

Only plain and quantized KV caches are trimmed unconditionally; a model with other layer
caches (rotating, recurrent) is never paused: its sequences keep their places.

Threading: worker thread only.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

from .cache import cache_bytes, settle
from .models import LoadedModel


@dataclass(eq=False)
class Held:
    """A paused sequence's state: its KV for ``tokens``, then ``feed`` to process again
    (the last streamed token; more only if the state held fewer than it should)."""

    state: list[Any]
    tokens: list[int]
    feed: list[int]
    nbytes: int


_PAUSABLE: weakref.WeakKeyDictionary[LoadedModel, bool] = weakref.WeakKeyDictionary()


def can_pause(loaded: LoadedModel) -> bool:
    """Whether ``loaded``'s sequences can leave a batch and come back token-exact."""
    known = _PAUSABLE.get(loaded)
    if known is None:
        caches = make_prompt_cache(loaded.model)
        known = _PAUSABLE[loaded] = all(type(c) in (KVCache, QuantizedKVCache) for c in caches)
    return known


def take_out(generator: Any, uid: int, sampler: Any) -> Held | None:
    """Remove sequence ``uid`` from ``generator``, keeping what it needs to go on; None if
    it had nothing to keep (the generator did not know it)."""
    removed = generator.remove([uid], return_prompt_caches=True)
    if uid not in removed:
        return None
    state, tokens = removed[uid]
    tokens = list(tokens)
    if not state or not tokens:
        return None
    # Copied compact: a state taken out of a batch is a view of the whole batch's arrays.
    kept = settle(state, tokens[:-1])
    if kept is None:
        return None
    rewind = getattr(sampler, "rewind", None)
    if rewind is not None:
        rewind()
    return Held(state, kept, tokens[len(kept) :], cache_bytes(state))


def put_back(generator: Any, held: Held, remaining: int, sampler: Any, processors: Any) -> int:
    """Insert a paused sequence into ``generator``; returns its new uid."""
    (uid,) = generator.insert(
        [held.feed],
        max_tokens=[remaining],
        caches=[held.state],
        all_tokens=[held.tokens],
        samplers=[sampler],
        logits_processors=[processors],
    )
    return int(uid)
