"""Intake: a generate's way from the inbox into the wait queue.

A ``generate`` (or a ``warm``: a one-token generate that streams nothing, its state
stored under exactly its prompt, daemon/endings.py) is checked against the daemon's
``max_tokens`` limit, resolves its model (loading it on this thread if need be, its
progress reported as the weights are read), has its prompt rendered and tokenized
(daemon/rendering.py) and joins the wait queue (daemon/admission.py).

Big prompts are tokenized on a tokenizer thread (daemon/prompts.py) and come back through
the inbox as ``Tokenized`` commands, so the worker's rounds go on meanwhile. A cancel marks
its sink at once (``Inbox.cancelled``), so a request still in the inbox or waiting for the
tokenizer is answered ``cancelled`` without a load, tokenizing or a place in the queue.

Threading: the tokenizing job runs on the tokenizer thread (HF tokenizer work only, never
MLX; it reads ``Inbox.cancelled`` and ``config``, each one atomic read); every method runs
on the worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlxd.protocol import Done, Error, Generate, Warm

from .admission import Admission
from .cache import PromptCache
from .config import Config
from .endings import cancelled_unstarted
from .inbox import Inbox, Submit, Tokenized
from .models import LoadedModel, LoadProgress, ModelRegistry
from .outbox import Event
from .prompts import INLINE_CHARS, TokenizerThread, text_chars
from .rendering import prompt_tokens, refuse_oversized
from .sampling import InvalidField

ProgressFor = Callable[[Any, int], LoadProgress]
"""How a model load reports its progress to ``sink`` for request ``id`` (the worker's)."""


class Intake:
    """Generates on their way to the wait queue, and the prompts on the tokenizer thread."""

    def __init__(
        self,
        config: Config,
        cache: PromptCache,
        models: ModelRegistry,
        admission: Admission,
        inbox: Inbox,
        progress: ProgressFor,
    ) -> None:
        self.config = config
        """Replaced by the worker on a reload, between rounds."""
        self._cache = cache
        self._models = models
        self._admission = admission
        self._inbox = inbox
        self._progress = progress
        self._tokenizer = TokenizerThread()
        self._tokenizing: dict[Any, Generate] = {}  # sinks on the tokenizer thread

    def start(
        self,
        req: Generate,
        sink: Any,
        received_at: float,
        warm: Warm | None = None,
        tokens: list[int] | None = None,
    ) -> None:
        """Queue ``req``, or hand its prompt to the tokenizer thread first; raises what
        refuses it."""
        if req.max_tokens > self.config.max_tokens_limit:
            raise InvalidField(
                "$.max_tokens",
                f"max_tokens is over this daemon's limit of {self.config.max_tokens_limit}",
            )
        loaded = self._models.get(req.model, req.keep_alive, self._progress(sink, req.id))
        if tokens is None:
            if self._tokenize_elsewhere(req, sink, received_at, loaded, warm):
                return  # back as a Tokenized command, which calls this again with them
            tokens = prompt_tokens(req, loaded, self.config.max_prompt_tokens, warm is not None)
        self._admission.enqueue(req, sink, received_at, loaded, tokens, warm)

    def warm(self, req: Warm, sink: Any, received_at: float) -> None:
        if self._cache.max_bytes <= 0:
            raise InvalidField("$.type", "the prompt cache is disabled on this daemon")
        # A one-token generation that streams nothing: the prefill is the point. Its token
        # is the step that computes the prompt's last KV; it is neither sent nor stored.
        as_generate = Generate(
            id=req.id,
            model=req.model,
            prompt=req.prompt,
            messages=req.messages,
            tokens=req.tokens,
            tools=req.tools,
            max_tokens=1,
            keep_alive=req.keep_alive,
            priority=req.priority,
        )
        self.start(as_generate, sink, received_at, warm=req)

    def tokenized(self, command: Tokenized) -> None:
        """Go on with a prompt the tokenizer thread is done with."""
        if command.error is not None:
            raise command.error
        self.start(
            command.request,
            command.sink,
            command.received_at,
            warm=command.warm,
            tokens=command.tokens,
        )

    def _tokenize_elsewhere(
        self, req: Generate, sink: Any, received_at: float, loaded: LoadedModel, warm: Warm | None
    ) -> bool:
        """Refuse a prompt that its size alone puts over the limits; hand a big one to the
        tokenizer thread (True), whose result comes back through the inbox."""
        refuse_oversized(req, loaded, self.config.max_prompt_tokens)
        if req.tokens is not None or text_chars(req) <= INLINE_CHARS or self.config.distributed:
            return False  # (distributed: every rank tokenizes in the same round)
        self._tokenizing[sink] = req

        def job() -> None:  # on the tokenizer thread: HF tokenizer work only, no MLX
            tokens: list[int] | None = None
            error: Exception | None = None
            if sink not in self._inbox.cancelled:
                try:
                    cap = self.config.max_prompt_tokens
                    tokens = prompt_tokens(req, loaded, cap, warm is not None)
                except Exception as exc:  # the worker replies with it, as if it were its own
                    error = exc
            self._inbox.put(Tokenized(req, sink, received_at, warm, tokens, error))

        self._tokenizer.submit(job)
        return True

    # ------------------------------------------------------------------ cancels

    def cancel(self, sink: Any) -> None:
        """``sink``'s cancel came out of the inbox: its mark can go, unless its prompt is on
        the tokenizer thread."""
        if sink not in self._tokenizing:
            self._inbox.cancelled.discard(sink)  # else its Tokenized still has to see it

    def cancelled_early(self, command: Submit | Tokenized) -> Done | None:
        """The ``done`` of a generate cancelled (or its connection gone) while it waited in
        the inbox or to be tokenized: no model load, no tokenizing, no place in the queue.
        None for one that goes on, and for any other request."""
        if isinstance(command, Tokenized):
            self._tokenizing.pop(command.sink, None)
        req = command.request
        if not isinstance(req, Generate | Warm) or command.sink not in self._inbox.cancelled:
            return None
        tokens = command.tokens if isinstance(command, Tokenized) else None
        if isinstance(command, Tokenized):
            self._inbox.cancelled.discard(command.sink)
        return cancelled_unstarted(req, command.received_at, len(tokens or ()))

    def end_all(self, code: str, message: str, events: list[Event]) -> None:
        """Every prompt on the tokenizer thread ends with an ``error``; the thread stops."""
        for sink, req in self._tokenizing.items():
            events.append((sink, Error(id=req.id, code=code, message=message)))
        self._tokenizing.clear()
        self._tokenizer.stop()
