"""What the worker knows of running work: a model's ``Batch`` (the generator its sequences
decode on, and those sequences) and each ``Sequence`` (one running generate or warm-up:
its prompt, cache use, stop matcher, detokenizer and reasoning split, counts and times).

``Sequences`` (daemon/sequences.py) creates and changes them; admission, endings and the
profile read them.

Threading: worker thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlx_lm.generate import BatchGenerator

from mlxd.protocol import CacheUse, Generate, ToolCall, Warm

from .cache import Lease
from .channels import Split
from .config import Config
from .memory import Footprint
from .models import LoadedModel
from .sampling import StopMatcher
from .solo import SoloGenerator
from .speculative import Speculation

if TYPE_CHECKING:
    from .admission import Waiting


@dataclass(eq=False)
class Batch:
    """One model's continuous batch: its ``BatchGenerator`` and the sequences in it."""

    model: LoadedModel
    generator: BatchGenerator | SoloGenerator
    sequences: dict[int, Sequence] = field(default_factory=dict)  # by the generator's uid
    solo: bool = False
    config: Config | None = None
    """The configuration its sizes came from: rebuilt, once empty, after a reload."""


@dataclass(eq=False)
class Sequence:
    """One running generate (or warm-up), in its batch."""

    request: Generate
    sink: Any
    model: LoadedModel
    batch: Batch
    uid: int
    prompt: list[int]
    cache_use: CacheUse
    cached_tokens: int
    lease: Lease | None
    stop: StopMatcher
    received_at: float
    started_at: float
    span: int = 0
    """Tokens of KV it may hold: prompt plus max_tokens, at most the context."""
    max_tokens: int = 0
    """Tokens it may generate: ``max_tokens``, capped so that prompt plus generated tokens
    stay within the model's context (``span`` less the prompt)."""
    held: int = 0
    """Bytes of the cached state it took, until its prefill merges it into the batch."""
    warm: Warm | None = None
    split: Split | None = None
    """Its detokenizer, and which channel its text goes to (daemon/channels.py)."""
    first_token_at: float | None = None
    completion_tokens: int = 0
    text: list[str] = field(default_factory=list)
    """What was streamed, for the next turn's key."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The calls it made, for ``done`` and the next turn's key."""
    eos: frozenset[int] = field(default_factory=frozenset)
    speculation: Speculation | None = None
    """How it speculates while alone, and what it drafted (daemon/speculative.py)."""
    origin: Waiting | None = None
    """Its queue entry: where it goes back to (with its sampler) if its owner is paused."""

    def footprint(self, prefill_step: int) -> Footprint:
        prefilling = self.first_token_at is None
        rest = len(self.prompt) - self.cached_tokens
        return Footprint(
            span=self.span,
            prefill=min(prefill_step, rest) if prefilling else 0,
            context=len(self.prompt),
            held=self.held if prefilling else 0,
        )


def forward_passes(batch: Batch) -> int:
    """Forward passes one step of ``batch`` ran: one for its decoding sequences, one for
    the prompts it prefills (the sequence of a solo generator does one or the other)."""
    if batch.solo:
        return 1
    states = {s.first_token_at is None for s in batch.sequences.values()}
    return len(states)
