"""A prompt's size before tokenizing it, and the thread that tokenizes big ones.

Tokenizing megabytes of text takes seconds (HF tokenizers and chat templates; no MLX). On
the worker thread that would hold up every stream, and a client that sends huge prompts
and leaves would keep it busy long after. So:

- ``max_token_bytes`` (once, at model load): L, the most bytes of text one token of the
  vocabulary stands for. A text of B bytes is at least ceil(B / L) tokens, so a prompt
  whose bound (``least_tokens``) is already over the limits is refused with
  ``prompt_too_long`` without being tokenized. A tokenizer whose normalizer may shrink
  the text (NFC, NFKC: at most 4 bytes become 1) has its bound divided by 4; one whose
  normalizer may delete text, or whose tokens need not cover the text (WordPiece, no
  byte-level or SentencePiece decoder), gets no bound (None): it is only tokenized.
- ``TokenizerThread``: one thread that tokenizes the prompts over ``INLINE_CHARS`` for the
  worker, in the order they were handed to it (a small prompt, tokenized on the worker
  at once, may so start before a big one sent earlier). Each job returns its result
  through the worker's inbox; a job whose request was cancelled before its turn is
  skipped.

Threading: ``max_token_bytes`` on the worker (at load); ``least_tokens`` and
``text_chars`` anywhere; ``TokenizerThread.submit`` from the worker, its jobs on its own
thread. A HF fast tokenizer may be used by two threads at once as long as neither changes
its truncation or padding, which mlxd never does.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from typing import Any

import structlog
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

from mlxd.protocol import Generate

log = structlog.get_logger("mlxd.prompts")

INLINE_CHARS = 16 * 1024
"""Prompts up to this many characters are tokenized on the worker at once (a few ms):
handing them over would only delay them, and split a burst the worker batches as one."""

_GROWING = {"Prepend", "Append"}
"""Normalizers that only add text; ``Replace`` too when its content is no shorter."""
_SHRINKING = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}
"""Normalizers that may shrink a text's UTF-8 bytes, by at most 4x (U+1D400 -> "A")."""


def _shrink(spec: dict[str, Any]) -> int | None:
    """How many times the normalizer ``spec`` (its JSON) may shrink a text's bytes; None
    when it may delete text."""
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            f = _shrink(part)
            if f is None:
                return None
            factor *= f
        return factor
    if kind in _GROWING:
        return 1
    if kind == "Replace":
        pattern = spec.get("pattern", {}).get("String")
        content = spec.get("content", "")
        grows = isinstance(pattern, str) and len(content.encode()) >= len(pattern.encode())
        return 1 if grows and pattern else None
    return 4 if kind in _SHRINKING else None


def max_token_bytes(tokenizer: Any) -> int | None:
    """L for ``tokenizer`` (an mlx-lm ``TokenizerWrapper``), times what its normalizer may
    shrink a text by; None when no safe bound exists. Reads the vocabulary once."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    detokenizer = getattr(tokenizer, "_detokenizer", None)
    try:
        vocab = hf.get_vocab()
        added = set(hf.get_added_vocab())
        backend = getattr(hf, "backend_tokenizer", None)
        normalizer = backend.normalizer if backend is not None else None
        factor = 1 if normalizer is None else _shrink(json.loads(normalizer.__getstate__()))
    except Exception:  # a tokenizer we cannot read this way: no bound, only tokenizing
        return None
    if factor is None or backend is None:
        return None
    if isinstance(detokenizer, BPEStreamingDetokenizer):
        # Byte-level BPE: each character of a vocabulary string stands for one byte of
        # text; added tokens (specials) are matched as the text they spell.
        longest = max((len(t.encode()) if t in added else len(t) for t in vocab), default=0)
    elif isinstance(detokenizer, SPMStreamingDetokenizer):
        # SentencePiece: strings of the normalized text ("▁the"); byte fallbacks
        # ("<0x0A>") spell more than the byte they stand for, which only loosens the bound.
        longest = max((len(t.encode()) for t in vocab), default=0)
    else:
        return None
    return longest * factor or None


def _texts(req: Generate) -> list[str]:
    if req.messages is not None:
        # A template may drop part of an assistant turn (its reasoning): count the others.
        return [m.content for m in req.messages if m.role != "assistant"]
    return [req.prompt or "", req.suffix or ""]


def least_tokens(req: Generate, token_bytes: int | None) -> int:
    """A lower bound on the tokens of ``req``'s prompt, without tokenizing it: its
    ``tokens``, or its text's UTF-8 bytes over ``token_bytes`` (L); 0 with no L."""
    if req.tokens is not None:
        return len(req.tokens)
    if not token_bytes:
        return 0
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in _texts(req))
    return -(-size // token_bytes)


def text_chars(req: Generate) -> int:
    """What tokenizing ``req`` costs, roughly: its characters (a template's work per
    message counted as 64)."""
    if req.messages is not None:
        return sum(len(m.content) + 64 for m in req.messages)
    return len(req.prompt or "") + len(req.suffix or "")


class TokenizerThread:
    """Runs the jobs it is given, one at a time in order, on its own thread (started on
    the first job). A job reports its own result; one that raises is logged and skipped."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            # A daemon thread: a tokenization in progress must not hold up the exit.
            self._thread = threading.Thread(target=self._run, name="mlxd-tokenizer", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException:
                log.exception("tokenizer_job_failed")
