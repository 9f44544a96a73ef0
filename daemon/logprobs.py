"""Log-probabilities of generated tokens, for requests that ask for them (``Generate.logprobs``,
``Generate.top_logprobs``).

The numbers are the ones mlx-lm's generators sample from: the log-softmax of the model's
logits for that step after the request's logits processors (``logit_bias``,
``repetition_penalty``), before the sampler's transforms (temperature, top-p, min-p,
top-k, XTC), which only choose among them. ``BatchGenerator`` and ``generate_step`` both
hand these rows back with each token; this module reads, per round, the rows of the
sequences that asked: the chosen token's value and the ``top_logprobs`` best, in one
batched computation (``mx.argpartition`` over the stacked rows) and one move to Python.
Nothing is computed for a round in which no sequence asked.

Threading: worker thread only (MLX).
"""

from __future__ import annotations

import weakref
from typing import Any

import mlx.core as mx
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, _byte_decoder

from mlxd.protocol import Generate, TokenLogprob, TopLogprob


def requested(req: Generate) -> bool:
    return req.logprobs or req.top_logprobs > 0


def of_round(sequences: dict[int, Any], responses: list[Any]) -> dict[int, TokenLogprob]:
    """The ``TokenLogprob`` of each response (by uid) whose sequence asked for logprobs.
    ``sequences`` maps uids to ``Sequence``\\s; ``responses`` carry ``token`` and
    ``logprobs`` (the row of log-probabilities the token was sampled from)."""
    wanted = []
    for r in responses:
        seq = sequences.get(r.uid)
        if seq is not None and requested(seq.request) and r.logprobs is not None:
            wanted.append((r, seq))
    if not wanted:
        return {}
    rows = mx.stack([r.logprobs for r, _ in wanted]).astype(mx.float32)
    tokens = mx.array([r.token for r, _ in wanted])[:, None]
    chosen = mx.take_along_axis(rows, tokens, axis=-1)[:, 0]
    k = min(max(seq.request.top_logprobs for _, seq in wanted), rows.shape[-1])
    if k > 0:
        top = mx.argpartition(-rows, kth=k - 1, axis=-1)[:, :k]
        values = mx.take_along_axis(rows, top, axis=-1)
        order = mx.argsort(-values, axis=-1)  # most likely first
        top = mx.take_along_axis(top, order, axis=-1)
        values = mx.take_along_axis(values, order, axis=-1)
        mx.eval(chosen, top, values)
        top_ids, top_values = top.tolist(), values.tolist()
    else:
        mx.eval(chosen)
        top_ids = top_values = [[] for _ in wanted]
    out = {}
    for (r, seq), logprob, ids, values in zip(
        wanted, chosen.tolist(), top_ids, top_values, strict=True
    ):
        table = _bytes_table(seq.model.tokenizer)
        n = seq.request.top_logprobs
        alternatives = [
            TopLogprob(token=t, logprob=v, bytes=table(t))
            for t, v in zip(ids[:n], values[:n], strict=True)
        ]
        out[r.uid] = TokenLogprob(
            token=r.token, logprob=logprob, bytes=table(r.token), top_logprobs=alternatives
        )
    return out


class _TokenBytes:
    """A tokenizer's bytes of each token, looked up as tokens come: a byte-level BPE
    token's own bytes (so a piece of a multi-byte character is that piece), else the
    UTF-8 of the token decoded alone."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
        self._known: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        known = self._known.get(token)
        if known is None:
            known = self._known[token] = self._lookup(token)
        return known

    def _lookup(self, token: int) -> bytes:
        if self._byte_level:
            piece = self._tokenizer.convert_ids_to_tokens(token)
            decoder = _byte_decoder()
            if isinstance(piece, str) and all(c in decoder for c in piece):
                return bytes(decoder[c] for c in piece)
        return self._tokenizer.decode([token]).encode()


_TABLES: weakref.WeakKeyDictionary[Any, _TokenBytes] = weakref.WeakKeyDictionary()


def _bytes_table(tokenizer: Any) -> _TokenBytes:
    table = _TABLES.get(tokenizer)
    if table is None:
        table = _TABLES[tokenizer] = _TokenBytes(tokenizer)
    return table
