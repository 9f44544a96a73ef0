"""A running sequence's new token turned into what its client gets: a chunk, or its ending.

The per-token part of a round (``Sequences.step_all``, daemon/sequences.py): the token
counted against ``max_tokens``, split into reasoning and answer (daemon/reasoning.py), the
answer matched against the stop strings (daemon/sampling.py), and the ``Ending`` it reaches
(end of sequence, ``max_tokens``, a stop string) with its last chunk: the held-back text,
the token's logprobs. These functions advance only the ``Sequence``'s own records;
ending it (its state back to the cache, ``done``) stays with ``Sequences``.

Threading: worker thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlxd.protocol import Chunk, TokenLogprob

from .logprobs import requested

if TYPE_CHECKING:
    from .running import Sequence


@dataclass(slots=True)
class Ending:
    """How a sequence ends (``stop``, ``length``, ``cancelled``) and what its last chunk
    carries."""

    reason: str
    text: str = ""
    tokens: list[int] | None = None
    stopped: bool = False
    """``text`` went through the stop matcher already, and a stop string ended it."""
    reasoning: str = ""
    lps: list[TokenLogprob] | None = None


def advance(seq: Sequence, token: int, logprob: TokenLogprob | None) -> Chunk | Ending | None:
    """Feed ``seq`` the ``token`` its generator produced: the chunk to send, the ``Ending``
    it reached, or None (a warm-up's token: nothing to send)."""
    lps = None if logprob is None else [logprob]
    assert seq.split is not None
    if token in seq.eos:
        reasoning, text = seq.split.finish()
        return Ending("stop", text, reasoning=reasoning)
    seq.completion_tokens += 1
    # max_tokens counts every generated token, reasoning and answer alike.
    reasoning, text = seq.split.add(token)
    if seq.completion_tokens >= seq.max_tokens:
        more_reasoning, more_text = seq.split.finish()
        reasoning, text = reasoning + more_reasoning, text + more_text
        return Ending("length", text, [token], reasoning=reasoning, lps=lps)
    # Stop strings are matched in the answer only, as vLLM and Ollama do.
    text, stopped = seq.stop.feed(text)
    if stopped:
        return Ending("stop", text, [token], True, reasoning=reasoning, lps=lps)
    if seq.warm is not None:
        return None
    seq.text.append(text)
    return Chunk(id=seq.request.id, text=text, tokens=[token], reasoning=reasoning, logprobs=lps)


def last_chunk(seq: Sequence, ending: Ending) -> tuple[str, Chunk | None]:
    """The reason ``seq`` ends with (``stop`` if a stop string turns up in the text it held
    back) and its last chunk, if it has one to send: the rest of its text, released."""
    reason, text, lps = ending.reason, ending.text, ending.lps
    if reason == "cancelled":
        return reason, None
    if not ending.stopped:
        text, stopped = seq.stop.feed(text)
        text += "" if stopped else seq.stop.flush()
        reason = "stop" if stopped else reason
    if not (text or ending.tokens or ending.reasoning) or seq.warm is not None:
        return reason, None
    seq.text.append(text)
    if lps is None and requested(seq.request):
        lps = []  # text held back, released with no token of its own
    chunk = Chunk(
        id=seq.request.id,
        text=text,
        tokens=ending.tokens or [],
        reasoning=ending.reasoning,
        logprobs=lps,
    )
    return reason, chunk
