"""How a generate ends: the ``done`` that reports it, and its KV state returned to the
prompt cache under the key the next request will look it up by.

``done`` reports a sequence's usage and timings so far; a request cancelled before it
started (in the inbox, on the tokenizer thread, in the wait queue) gets one too, with what
is known of it then.

When a sequence ends (done, stop, cancel, shutdown), the generator hands back its own
state and every token in it; that goes into the prompt cache (daemon/cache.py), so the next
turn or keystroke starts from it, if the request allowed caching, the model is still
resident and the budget (daemon/memory.py) can make room for it. A warm-up's state is
stored under exactly its prompt (its prefill samples one token, never sent nor kept) and
pinned for its ``ttl_s``.

Next-turn keys: a chat reply's state is stored under the tokens the next turn will send
for the same conversation (history plus this reply, rendered by the chat template), not
under the tokens it generated, so the next turn hits even where the template renders the
reply differently (a stop string, reasoning removed, an end-of-turn marker).

Threading: worker thread only (re-keying a state runs the model on it).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from mlxd.protocol import Done, Error, Generate, Timings, Usage, Warm, errors

from . import clock
from .cache import PromptCache, cache_bytes, cache_length
from .memory import MemoryBudget
from .models import ModelRegistry
from .rendering import fim_mode, next_turn_tokens

if TYPE_CHECKING:
    from .admission import Waiting
    from .running import Sequence


def done(seq: Sequence, reason: str) -> Done:
    """``seq``'s ``done``: its usage and timings so far. A warm-up's says what its prefill
    did, and no finish reason unless it was cancelled: it generates nothing."""
    now = time.perf_counter()
    first = seq.first_token_at or now
    decode_s = now - first
    n = seq.completion_tokens
    rate = (n - 1) / decode_s if n > 1 and decode_s > 0 and seq.warm is None else 0.0
    finish = reason if seq.warm is None or reason == "cancelled" else None
    return Done(
        id=seq.request.id,
        finish_reason=finish,  # type: ignore[arg-type]
        stop_sequence=seq.stop.matched if finish == "stop" else None,
        usage=Usage(
            prompt_tokens=len(seq.prompt),
            cached_tokens=seq.cached_tokens,
            completion_tokens=0 if seq.warm else seq.completion_tokens,
        ),
        timings=Timings(
            queue_s=seq.started_at - seq.received_at,
            ttft_s=first - seq.received_at,
            total_s=now - seq.received_at,
            tokens_per_s=rate,
        ),
        cache=seq.cache_use,
        speculative=seq.speculation.use() if seq.speculation is not None else None,
        fim=fim_mode(seq.request, seq.model),  # type: ignore[arg-type]
    )


def _waited(received_at: float) -> Timings:
    waited = time.perf_counter() - received_at
    return Timings(queue_s=waited, ttft_s=waited, total_s=waited, tokens_per_s=0.0)


def cancelled_unstarted(req: Generate | Warm, received_at: float, prompt_tokens: int) -> Done:
    """The end of a request cancelled before it was tokenized or queued."""
    return Done(
        id=req.id,
        finish_reason="cancelled",
        usage=Usage(prompt_tokens=prompt_tokens, cached_tokens=0, completion_tokens=0),
        timings=_waited(received_at),
    )


def cancelled_before_start(waiting: Waiting) -> Done:
    """The end of a request cancelled in the wait queue (a paused sequence's, as far as it
    got)."""
    if waiting.paused is not None:
        return done(waiting.paused, "cancelled")
    return Done(
        id=waiting.request.id,
        finish_reason="cancelled",
        fim=fim_mode(waiting.request, waiting.model),  # type: ignore[arg-type]
        usage=Usage(prompt_tokens=len(waiting.prompt), cached_tokens=0, completion_tokens=0),
        timings=_waited(waiting.received_at),
    )


def warm_refused(seq: Sequence, final: tuple[list[Any], list[int]] | None) -> Error:
    """Why a warm-up's state was not kept: a cache that cannot be cut back to the prompt
    (recurrent layers, a rotating window the prompt overflowed), or no room for it."""
    state = final[0] if final is not None else None
    if state and cache_length(state) > len(seq.prompt) and not can_trim_prompt_cache(state):
        message = (
            f"model {seq.model.name!r} keeps a KV state that cannot be cut back to the prompt, "
            "so a warm-up of it cannot be stored"
        )
        return Error(id=seq.request.id, code=errors.INVALID_REQUEST, message=message)
    message = "the prefilled state did not fit the prompt cache or the memory budget"
    return Error(id=seq.request.id, code=errors.INSUFFICIENT_MEMORY, message=message)


def return_state(
    seq: Sequence,
    final: tuple[list[Any], list[int]] | None,
    finished: bool,
    cache: PromptCache,
    budget: MemoryBudget,
    models: ModelRegistry,
    prefill_step: int,
) -> bool:
    """``final`` (``seq``'s KV state and every token it holds) goes back to the prompt
    cache, so the next turn or keystroke starts from it. Returns whether it did.
    ``finished``: the sequence ended on its own (not cancelled), so a chat reply is whole
    and may be re-keyed by its next turn."""
    if final is None or not seq.request.cache or cache.max_bytes <= 0:
        return False
    state, tokens = final
    if not (state and tokens and seq.model in models.resident()):
        return False
    tokens = list(tokens)
    pin = None
    if seq.warm is not None:
        # Exactly what was warmed: not the token its prefill's logits gave, which the
        # client never saw (a later generate of the same prompt is then an exact hit).
        tokens = list(seq.prompt)
        pin = _pin_until(seq.warm)
    elif finished and seq.request.messages is not None:
        tokens, state = _next_turn_key(seq, tokens, state, prefill_step)
    # The state can hold one token more than was streamed (the step ahead), and room to
    # grow: trimmed to the key and copied compact (quantized, with ``cache.kv_bits``)
    # before room is made for it: the budget is asked for what it will be charged.
    settled = cache.settle(state, tokens)
    if not settled:
        return False
    # Background work's states take the room of no other work's entries.
    background = seq.request.priority == "background"
    if not budget.make_room(cache_bytes(state), unload_models=False, for_background=background):
        return False
    return cache.insert(seq.model.name, settled, state, pin_until=pin, background=background)


def _pin_until(warm: Warm) -> float:
    if not warm.pin:
        return 0.0
    return math.inf if warm.ttl_s is None else clock.wall() + warm.ttl_s


def _next_turn_key(
    seq: Sequence, tokens: list[int], state: list[Any], prefill_step: int
) -> tuple[list[int], list[Any]]:
    """Re-key a chat reply's state by the tokens the next turn starts with: the history
    plus this reply, rendered by the template. Where the rendering departs from what was
    generated (the end-of-turn marker, a stop string, reasoning the template drops), trim
    the state back to where they agree and prefill the rendered rest, a few tokens."""
    assert seq.request.messages is not None
    reply = "".join(seq.text)
    rendered = next_turn_tokens(seq.request, reply, seq.tool_calls, seq.model.tokenizer)
    if rendered is None:
        return tokens, state
    held = min(len(tokens), cache_length(state))
    common = 0
    for a, b in zip(tokens[:held], rendered, strict=False):
        if a != b:
            break
        common += 1
    rest = rendered[common:]
    if not rest:
        return rendered, state
    if len(rest) > prefill_step or not can_trim_prompt_cache(state):
        return tokens, state
    excess = cache_length(state) - common
    if excess > 0:
        trim_prompt_cache(state, excess)
    seq.model.model(mx.array([rest]), cache=state)
    mx.eval([c.state for c in state])
    return rendered, state
