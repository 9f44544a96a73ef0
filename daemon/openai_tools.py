"""Tool calling in the OpenAI API: ``tools``, ``tool_choice`` and the history's calls as
native fields, and the native calls as OpenAI's ``tool_calls`` (whole, or streamed as
``delta.tool_calls`` fragments).

OpenAI carries a call's arguments as JSON text; natively they are an object, so they are
decoded here on the way in (text that is not a JSON object is a 400 naming it) and encoded
on the way out. A streamed call is sent as OpenAI streams one: a first fragment with its
``index``, ``id``, ``type`` and name and empty arguments, then its arguments; the
fragments of one index concatenate to the call.

Threading: pure data and pure functions; safe from any thread.
"""

from __future__ import annotations

import json
from typing import Any

from msgspec import Struct

from mlxd.protocol import NamedToolChoice, Tool, ToolCall, ToolFunction


class Refused(Exception):
    """A request field mlxd does not serve, or a value it cannot take: a 400 naming ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


# --------------------------------------------------------------------------- requests


class FunctionSpec(Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the schema is always enforced in full when a call is forced


class ToolSpec(Struct, kw_only=True):
    type: str
    function: FunctionSpec | None = None


class ChosenFunction(Struct, kw_only=True):
    name: str


class ToolChoiceObject(Struct, kw_only=True):
    type: str
    function: ChosenFunction | None = None


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str


class MessageToolCall(Struct, kw_only=True):
    function: FunctionCall
    id: str = ""
    type: str = "function"


def tool_fields(
    tools: list[ToolSpec] | None, choice: str | ToolChoiceObject | None
) -> dict[str, Any]:
    """The native ``tools`` and ``tool_choice`` of a chat body's."""
    fields: dict[str, Any] = {}
    if tools:
        native = []
        for i, t in enumerate(tools):
            if t.type != "function" or t.function is None:
                raise Refused(f"tools[{i}].type", f"tools of type {t.type!r} are not supported")
            f = t.function
            native.append(
                Tool(
                    function=ToolFunction(
                        name=f.name, description=f.description or "", parameters=f.parameters
                    )
                )
            )
        fields["tools"] = native
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise Refused("tool_choice", f"tool_choice {choice!r} is not none, auto or required")
        fields["tool_choice"] = choice
    elif choice is not None:
        if choice.type != "function" or choice.function is None:
            raise Refused(
                "tool_choice", 'tool_choice must name a function: {"type": "function", ...}'
            )
        fields["tool_choice"] = NamedToolChoice(name=choice.function.name)
    return fields


def history_calls(i: int, calls: list[MessageToolCall]) -> list[ToolCall]:
    """An assistant turn's ``tool_calls`` as native calls."""
    native = []
    for j, c in enumerate(calls):
        try:
            arguments = json.loads(c.function.arguments or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise Refused(
                f"messages[{i}].tool_calls[{j}].function.arguments",
                "a call's arguments must be a JSON object, as text",
            )
        native.append(ToolCall(id=c.id, name=c.function.name, arguments=arguments))
    return native


# --------------------------------------------------------------------------- responses


class CallOut(Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class DeltaFunction(Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaCall(Struct, omit_defaults=True):
    index: int
    function: DeltaFunction
    id: str | None = None
    type: str | None = None


def _arguments(call: ToolCall) -> str:
    return json.dumps(call.arguments, ensure_ascii=False)


def calls_out(calls: list[ToolCall]) -> list[CallOut] | None:
    """Native calls as a message's ``tool_calls`` (None: none)."""
    return [
        CallOut(c.id, FunctionCall(name=c.name, arguments=_arguments(c))) for c in calls
    ] or None


def call_fragments(call: ToolCall, index: int) -> list[DeltaCall]:
    """One call as the ``delta.tool_calls`` fragments of two chunks: its head, its arguments."""
    head = DeltaCall(index, DeltaFunction(name=call.name, arguments=""), call.id, "function")
    return [head, DeltaCall(index, DeltaFunction(arguments=_arguments(call)))]
