"""A running sequence's new token turned into what its client gets: a chunk, or its ending.

The per-token part of a round (``Sequences.step_all``, daemon/sequences.py): the token
counted against ``max_tokens``, split into reasoning, answer and tool calls
(daemon/channels.py), the answer matched against the stop strings (daemon/sampling.py), and
the ``Ending`` it reaches (end of sequence, ``max_tokens``, a stop string) with its last
chunk: the held-back text, the token's logprobs, the calls still open. A sequence that
made a call and ended by itself ends with ``tool_calls``. These functions advance only the
``Sequence``'s own records; ending it (its state back to the cache, ``done``) stays with
``Sequences``.

Threading: worker thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlxd.protocol import Chunk, TokenLogprob, ToolCall

from .channels import Piece
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
    calls: list[ToolCall] | None = None


def advance(seq: Sequence, token: int, logprob: TokenLogprob | None) -> Chunk | Ending | None:
    """Feed ``seq`` the ``token`` its generator produced: the chunk to send, the ``Ending``
    it reached, or None (a warm-up's token: nothing to send)."""
    lps = None if logprob is None else [logprob]
    assert seq.split is not None
    if token in seq.eos:
        piece = seq.split.finish()
        return Ending("stop", piece.text, reasoning=piece.reasoning, calls=piece.calls)
    seq.completion_tokens += 1
    # max_tokens counts every generated token, reasoning and answer alike.
    piece = seq.split.add(token)
    if seq.completion_tokens >= seq.max_tokens:
        piece += seq.split.finish()
        return _ending("length", piece, [token], lps=lps)
    # Stop strings are matched in the answer only, as vLLM and Ollama do.
    text, stopped = seq.stop.feed(piece.text)
    if stopped:
        return _ending("stop", piece._replace(text=text), [token], True, lps)
    if seq.warm is not None:
        return None
    seq.text.append(text)
    if piece.calls:
        seq.tool_calls.extend(piece.calls)
    return Chunk(
        id=seq.request.id,
        text=text,
        tokens=[token],
        reasoning=piece.reasoning,
        logprobs=lps,
        tool_calls=piece.calls,
    )


def _ending(
    reason: str,
    piece: Piece,
    tokens: list[int],
    stopped: bool = False,
    lps: list[TokenLogprob] | None = None,
) -> Ending:
    return Ending(reason, piece.text, tokens, stopped, piece.reasoning, lps, piece.calls)


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
    if ending.calls:
        seq.tool_calls.extend(ending.calls)
    if reason == "stop" and seq.tool_calls:
        reason = "tool_calls"  # as OpenAI and mlx-lm's server say it
    if not (text or ending.tokens or ending.reasoning or ending.calls) or seq.warm is not None:
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
        tool_calls=ending.calls,
    )
    return reason, chunk
