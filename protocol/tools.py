"""Tool (function) calling on the wire: the tools a chat ``generate`` offers the model, how
it must choose among them, and the calls it makes.

The shapes are OpenAI's (``{"type": "function", "function": {"name", "description",
"parameters"}}``), which Ollama takes too, so a client passes its tool definitions through
unchanged. A call's ``arguments`` are a JSON object, not OpenAI's JSON text: the HTTP
adapters encode them as each API wants. protocol/messages.py builds ``Generate``,
``ChatMessage`` and ``Chunk`` from these; re-exported whole by ``mlxd.protocol``.

Threading: pure data; safe from any thread.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from msgspec import Meta, Struct

MAX_TOOLS = 128
"""Tools one request may offer: each is rendered into the prompt by the chat template."""

ToolName = Annotated[str, Meta(min_length=1, max_length=256)]


class ToolFunction(Struct, kw_only=True, omit_defaults=True):
    """A function the model may call: its name, what it does, and a JSON Schema of its
    arguments (an object schema; absent: any object)."""

    name: ToolName
    description: str = ""
    parameters: dict[str, Any] | None = None


class Tool(Struct, kw_only=True):
    """One tool offered to the model; ``function`` is the only type. (The fields in
    OpenAI's order: a template that writes tools as JSON writes them as clients send them.)"""

    type: Literal["function"] = "function"
    function: ToolFunction


class ToolCall(Struct, kw_only=True):
    """A call the model made (in ``Chunk.tool_calls``), or one it made earlier, given back
    in a conversation's history (``ChatMessage.tool_calls``)."""

    id: Annotated[str, Meta(max_length=256)]
    """Unique within the daemon's run (``call_`` and 24 hex digits); a ``tool`` message
    answers the call by it (``tool_call_id``)."""
    name: ToolName
    arguments: dict[str, Any]


class NamedToolChoice(Struct, kw_only=True):
    """``tool_choice`` that names the function the model must call."""

    name: ToolName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]  # noqa: UP007
"""``none``: the model may not call a tool; ``auto``: it may (the default); ``required``:
it calls one or more; a ``NamedToolChoice``: it calls that one. ``required`` and a named
function are enforced by constrained decoding: the arguments always match the schema."""

__all__ = [
    "MAX_TOOLS",
    "NamedToolChoice",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolFunction",
]
