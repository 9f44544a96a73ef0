"""The wire contract: every message either side may send, as msgspec ``Struct``\\s.

Each message is a MessagePack map whose ``"type"`` field names it (a msgspec tagged
union), so a peer decodes one ``Union`` type once and dispatches on the class.
Field constraints live here too (``Meta``), so out-of-range values are refused while
decoding, with the offending field named, before any part of the daemon sees them.
The request options and per-token records of structured output, logprobs and reasoning
live in protocol/options.py, the records a ``done`` reports (usage, timings, cache use,
models, health, stats) in protocol/reports.py; the messages here use them.

Threading: pure data; safe from any thread.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from msgspec import Meta, Struct

# All of protocol/options.py and protocol/reports.py, so that ``from mlxd.protocol.messages
# import X`` goes on working for the names that were defined here before they were split out.
from .options import (  # noqa: F401
    MAX_TOP_LOGPROBS,
    Bytes,
    Format,
    GrammarFormat,
    JsonFormat,
    JsonSchemaFormat,
    ReasoningEffort,
    RegexFormat,
    SpeculativeMode,
    TokenLogprob,
    TopLogprob,
    _Format,
)
from .reports import (  # noqa: F401
    CacheStats,
    CacheUse,
    Health,
    MemorySplit,
    MemoryStats,
    ModelInfo,
    ServerStats,
    SpeculativeUse,
    Timings,
    Usage,
)
from .tools import MAX_TOOLS, NamedToolChoice, Tool, ToolCall, ToolChoice, ToolFunction  # noqa: F401

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; a server refuses a ``hello`` with another version."""

DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024

MAX_STOPS = 64
"""Stop strings per request: each is matched against every new token's text."""

RequestId = Annotated[int, Meta(ge=0, le=2**53 - 1)]  # 2**53: exact in a JavaScript number
ModelName = Annotated[str, Meta(min_length=1, max_length=512)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
# Bounded so that NaN and infinities are refused at decode time (every comparison with NaN fails).
Temperature = Annotated[float, Meta(ge=0.0, le=100.0)]
LogitBias = Annotated[float, Meta(ge=-100.0, le=100.0)]
KeepAlive = Annotated[float, Meta(ge=-1.0, le=10.0 * 365 * 86400)]

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]
Priority = Literal["interactive", "background"]
FimMode = Literal["tokens", "prefix_only"]


class _Message(Struct, tag_field="type", omit_defaults=True, kw_only=True):
    """Base for every message: tagged by ``type``, unset optional fields left off the wire."""


# --------------------------------------------------------------------------- client -> server


class Hello(_Message, tag="hello"):
    """First message on every connection; the server answers ``welcome`` or ``error``."""

    protocol: int
    client: Annotated[str, Meta(max_length=256)] = ""


ChatRole = Literal["system", "user", "assistant", "tool"]


class ChatMessage(Struct, kw_only=True, omit_defaults=True):
    """One turn of a conversation, rendered by the model's chat template: ``role`` and
    ``content`` required. An assistant turn may carry the ``tool_calls`` it made; a
    ``tool`` turn is a call's result, ``tool_call_id`` naming the call it answers."""

    role: ChatRole
    content: str
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Annotated[str, Meta(max_length=256)] | None = None
    name: Annotated[str, Meta(max_length=256)] | None = None
    """A ``tool`` turn: the function whose result it is (templates that want it)."""


class Generate(_Message, tag="generate"):
    """Stream a completion. Exactly one of ``prompt``, ``messages`` or ``tokens`` is given."""

    id: RequestId
    model: ModelName | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tokens: list[Annotated[int, Meta(ge=0)]] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] = 256
    temperature: Temperature = 0.0
    top_p: Probability = 1.0
    top_k: Annotated[int, Meta(ge=0)] = 0
    min_p: Probability = 0.0
    xtc_probability: Probability = 0.0
    xtc_threshold: Annotated[float, Meta(ge=0.0, le=0.5)] = 0.1
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    repetition_context_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 20
    logit_bias: dict[Annotated[int, Meta(ge=0)], LogitBias] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    stop: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=1024)]], Meta(max_length=MAX_STOPS)
    ] = []
    keep_alive: KeepAlive | None = None
    """Seconds the model stays resident after this request; -1 forever, 0 unload at once."""
    cache: bool = True
    """Use and update the prompt cache; false bypasses it for this request."""
    supersedes: RequestId | None = None
    """Cancel this earlier request of the same connection first (the last keystroke's)."""
    priority: Priority = "interactive"
    """``background`` work (bulk jobs) waits behind ``interactive`` requests for a place in
    the batch and for prefill, until it has waited the daemon's aging time."""
    suffix: str | None = None
    """Fill in the middle: ``prompt`` is the text before the cursor, this the text after it.
    Uses the model's FIM tokens when it has them, else drops the suffix (``done.fim`` says)."""
    format: Format | None = None
    """Constrain the output token by token to this (daemon/constraints.py)."""
    think: bool | None = None
    """With ``messages``: false turns a thinking model's thinking off in its chat template
    (``enable_thinking``); true on a model without thinking markers is ``invalid_request``."""
    reasoning_effort: ReasoningEffort | None = None
    """With ``messages``: passed to a chat template that takes ``reasoning_effort``; a
    template that does not is ``invalid_request``."""
    logprobs: bool = False
    """Each chunk carries the log-probability of each of its tokens (``Chunk.logprobs``)."""
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] = 0
    """The most likely tokens at each step, this many of them (implies ``logprobs``)."""
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    """With ``messages``: functions the model may call, passed to its chat template; its
    calls come back parsed, in ``Chunk.tool_calls`` (daemon/tools.py)."""
    tool_choice: ToolChoice | None = None
    """Whether and which tool the model must call; absent: ``auto``."""
    parallel_tool_calls: bool = True
    """False: ``tool_choice`` ``required`` makes exactly one call (not enforced for ``auto``:
    the model's own format is not constrained)."""
    speculative: SpeculativeMode | None = None
    """Speculative decoding while the sequence runs alone; absent: the model's configured
    mode, else ``off`` (daemon/speculative.py)."""


class Warm(_Message, tag="warm"):
    """Prefill a prompt into the prompt cache without generating: a system prompt, a file's
    header. ``messages`` are rendered without the generation prompt, so a later chat that
    starts with them finds them. ``pin`` keeps the entry through eviction (and saves it
    first on shutdown) for ``ttl_s`` seconds (absent: until the cache is cleared); warming
    the same prompt again with ``pin`` false unpins it. Ends with ``done`` (usage, cache)."""

    id: RequestId
    model: ModelName | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tokens: list[Annotated[int, Meta(ge=0)]] | None = None
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    """With ``messages``: the tools a later chat will offer (the template writes them
    first, so they are part of the prefix)."""
    pin: bool = False
    ttl_s: Annotated[float, Meta(gt=0.0, le=10.0 * 365 * 86400)] | None = None
    keep_alive: KeepAlive | None = None
    priority: Priority = "interactive"


class Cancel(_Message, tag="cancel"):
    """Cancel request ``target`` of this connection; it ends with finish_reason cancelled."""

    id: RequestId
    target: RequestId


class Load(_Message, tag="load"):
    id: RequestId
    model: ModelName
    keep_alive: KeepAlive | None = None


class Unload(_Message, tag="unload"):
    id: RequestId
    model: ModelName


class ListModels(_Message, tag="models"):
    id: RequestId


class ClearCache(_Message, tag="clear_cache"):
    """Drop the prompt cache of ``model``, or of every model when absent."""

    id: RequestId
    model: ModelName | None = None


class GetStats(_Message, tag="stats"):
    id: RequestId
    reset_peak: bool = False
    """Start the peak-memory figures over after reading them."""


class Ping(_Message, tag="ping"):
    id: RequestId


class GetHealth(_Message, tag="health"):
    """Answered by the event loop itself, even while the worker is busy (loading, say)."""

    id: RequestId


_REQUESTS = (
    Hello, Generate, Warm, Cancel, Load, Unload, ListModels, ClearCache, GetStats, Ping,
    GetHealth,
)  # fmt: skip
Request = Union[_REQUESTS]  # type: ignore[valid-type]  # noqa: UP007
REQUEST_TYPES: frozenset[str] = frozenset(t.__struct_config__.tag for t in _REQUESTS)

# --------------------------------------------------------------------------- server -> client


class Welcome(_Message, tag="welcome"):
    protocol: int
    server: str
    max_frame_bytes: int
    default_model: str | None = None


class Queued(_Message, tag="queued"):
    """Request ``id`` waits for a place in its model's batch; 0 is next. Sent when it is
    queued and whenever its place changes; nothing is sent for a request that starts at once."""

    id: int
    position: int


class Progress(_Message, tag="progress"):
    """Request ``id`` waits for its model to load, and this much of it is done.

    Sent to the request that caused the load (a ``load``, or a ``generate``/``warm`` whose
    model was not resident): first with ``done_bytes`` 0 once the size is known, then after
    each group of weights is read, the last with ``done_bytes == total_bytes``; at most
    about twenty per load. ``total_bytes`` is the model's weights in memory, the
    ``bytes`` of its model info. Clients that do not care ignore it."""

    id: int
    stage: str
    """``loading``: reading the weights into memory. Other values may come: ignore them."""
    model: str
    done_bytes: int
    total_bytes: int


class Chunk(_Message, tag="chunk"):
    """Newly generated tokens of request ``id`` and the text that is now safe to show.

    ``text`` can lag ``tokens`` while it might still turn out to be the start of a stop
    string or an incomplete UTF-8 sequence; it is released in a later chunk (or ``done``
    drops it if it was a stop string).
    """

    id: int
    text: str
    tokens: list[int]
    reasoning: str = ""
    """A thinking model's reasoning text (between its thinking markers), apart from
    ``text``, the answer; left off when empty."""
    logprobs: list[TokenLogprob] | None = None
    """Only when the request asked for ``logprobs``: one per token of ``tokens``, in order."""
    tool_calls: list[ToolCall] | None = None
    """Calls the model made, each whole, in the chunk whose token completed it; the text
    of a call is in neither ``text`` nor ``reasoning``."""

    def absorb(self, later: Chunk) -> None:
        """Append ``later`` (the next chunk of the same request) to this one: a stream that
        fell behind sends what piled up as one chunk. Every per-token field joins here."""
        self.text += later.text
        self.tokens.extend(later.tokens)
        self.reasoning += later.reasoning
        if self.logprobs is not None and later.logprobs is not None:
            self.logprobs.extend(later.logprobs)  # still one per token, in order
        if later.tool_calls:
            self.tool_calls = [*(self.tool_calls or []), *later.tool_calls]


class Done(_Message, tag="done"):
    """The successful end of request ``id``; which fields are set depends on the request."""

    id: int
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    """``finish_reason`` ``stop`` by a stop string: that string (not set for end-of-sequence)."""
    usage: Usage | None = None
    timings: Timings | None = None
    cache: CacheUse | None = None
    speculative: SpeculativeUse | None = None
    """A generate that speculated (asked, or by its model's configuration): what it did."""
    fim: FimMode | None = None
    """A generate with ``suffix``: ``tokens`` (the model's FIM tokens framed prefix and
    suffix) or ``prefix_only`` (the model has none: the suffix was dropped)."""
    model: ModelInfo | None = None
    """``load``: the model now resident; ``generate``: not set (see the request's model)."""
    models: list[ModelInfo] | None = None
    stats: ServerStats | None = None
    health: Health | None = None


class Error(_Message, tag="error"):
    """The failed end of request ``id`` (``id`` is absent when the frame could not be read)."""

    code: str
    message: str
    id: int | None = None
    field: str | None = None
    """The offending request field, for ``invalid_request``, as a path like ``$.top_p``."""


ServerMessage = Union[Welcome, Queued, Progress, Chunk, Done, Error]  # noqa: UP007

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_STOPS",
    "PROTOCOL_VERSION",
    "REQUEST_TYPES",
    "Cancel",
    "ChatMessage",
    "ChatRole",
    "Chunk",
    "ClearCache",
    "Done",
    "Error",
    "FimMode",
    "FinishReason",
    "Generate",
    "GetHealth",
    "GetStats",
    "Hello",
    "ListModels",
    "Load",
    "Ping",
    "Priority",
    "Progress",
    "Queued",
    "Request",
    "ServerMessage",
    "Unload",
    "Warm",
    "Welcome",
]
