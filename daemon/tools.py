"""Tool calls: a chat request's ``tools`` checked and given to the chat template, the calls
in a sequence's output read back, and ``tool_choice`` enforced.

A model can call tools when mlx-lm finds a tool-call format it knows in its chat template
(``has_tool_calling``, ``tool_call_start``/``tool_call_end``, ``tool_parser``). With
``tool_choice`` ``auto`` the model decides: the text between its markers goes to its own
family's parser (mlx-lm's), at the end marker, and becomes a ``ToolCall``; text that does
not parse is given back as answer text, markers and all, never dropped. ``none`` bans the
start marker (when it is one token; the model's own format cannot then begin).
``required`` and a named function are enforced by constrained decoding (daemon/constraints.py):
the output is then JSON, not the model's own format, as vLLM does it: a named function's
arguments (its ``parameters`` schema), or for ``required`` a list of ``{"name",
"arguments"}`` calls, one or more, each matching its function's schema. Every family's
model can be held to that; its own format (XML parameters, say) often cannot.

The calls a reply made go back into the conversation by the template (the next turn's
history and cache key, daemon/endings.py): ``template_messages`` renders them as mlx-lm's
server does, arguments as an object.

Threading: ``template_tools``, ``template_messages`` and ``forced_format`` on the worker
or the tokenizer thread (they only read the request and the tokenizer); ``CallReader``
and ``tool_ban`` on the worker thread.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import msgspec

from mlxd.protocol import (
    ChatMessage,
    Generate,
    JsonSchemaFormat,
    NamedToolChoice,
    Tool,
    ToolCall,
)

from .constraints import constraint_for
from .sampling import InvalidField


def forced(req: Generate) -> bool:
    """Whether ``req`` must call a tool (``required`` or a named function)."""
    return bool(req.tools) and (
        req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)
    )


def template_tools(req: Generate, tokenizer: Any, model: str) -> list[dict[str, Any]] | None:
    """The chat template's ``tools``, or None when the request offers none; raises
    ``InvalidField`` for tools the model or the request cannot take."""
    choice = req.tool_choice
    if not req.tools:
        if choice == "required" or isinstance(choice, NamedToolChoice):
            raise InvalidField("$.tool_choice", "tool_choice required or a function needs tools")
        return None
    if req.messages is None:
        raise InvalidField("$.tools", "tools go with messages (the chat template)")
    if not tokenizer.has_tool_calling:
        raise InvalidField(
            "$.tools",
            f"model {model!r} does not support tool calling: its chat template has no "
            "tool-call format mlx-lm knows",
        )
    names: set[str] = set()
    for i, tool in enumerate(req.tools):
        name = tool.function.name
        if name in names:
            raise InvalidField(f"$.tools[{i}].function.name", f"a second tool named {name!r}")
        names.add(name)
    if isinstance(choice, NamedToolChoice) and choice.name not in names:
        raise InvalidField("$.tool_choice.name", f"no tool named {choice.name!r} in tools")
    if req.format is not None and forced(req):
        raise InvalidField(
            "$.format",
            "format cannot go with tool_choice required or a function: the call's schema is "
            "the format",
        )
    return tool_dicts(req.tools)


def tool_dicts(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """``tools`` as a chat template (and mlx-lm's parsers) take them: OpenAI's JSON."""
    return [msgspec.to_builtins(t) for t in tools]


def template_messages(
    messages: Sequence[ChatMessage], calls: Sequence[ToolCall] = ()
) -> list[dict[str, Any]]:
    """``messages`` as the chat template takes them, and ``calls`` (a reply's) appended to
    the last; a call as ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
    out = []
    for m in messages:
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            turn["tool_calls"] = [_template_call(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            turn["name"] = m.name
        out.append(turn)
    if calls:
        out[-1]["tool_calls"] = [_template_call(c) for c in calls]
    return out


def _template_call(call: ToolCall) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.id, "type": "function", "function": function}


def _arguments_schema(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object"}


def forced_format(req: Generate) -> tuple[JsonSchemaFormat, str] | None:
    """The format that enforces ``req``'s ``tool_choice`` and the field to name if it does
    not compile; None when the model chooses (``auto``, ``none``)."""
    if not forced(req):
        return None
    assert req.tools is not None
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        i, tool = next((i, t) for i, t in enumerate(req.tools) if t.function.name == choice.name)
        return JsonSchemaFormat(schema=_arguments_schema(tool)), f"$.tools[{i}].function.parameters"
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": _arguments_schema(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in req.tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not req.parallel_tool_calls:
        schema["maxItems"] = 1
    return JsonSchemaFormat(schema=schema), "$.tools"


def tool_ban(req: Generate, tokenizer: Any, vocab_size: int) -> Any:
    """For ``tool_choice`` ``none``: a logits processor that bans the start of a call (its
    marker token), or None where there is nothing to ban."""
    if not req.tools or req.tool_choice != "none":
        return None
    start = tokenizer.tool_call_start_tokens or ()
    if len(start) != 1 or start[0] >= vocab_size:
        return None  # a multi-token marker: its text stays answer text (never parsed)
    ban = mx.zeros((vocab_size,)).at[start[0]].add(-mx.inf)

    def banned(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits + ban.astype(logits.dtype)

    return banned


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def reader_for(req: Generate, tokenizer: Any) -> CallReader | None:
    """The reader of ``req``'s tool calls; None when it offers no tools or chose ``none``."""
    if not req.tools or req.tool_choice == "none":
        return None
    assert req.tools is not None
    named = req.tool_choice.name if isinstance(req.tool_choice, NamedToolChoice) else None
    return CallReader(tokenizer, tool_dicts(req.tools), forced(req), named)


class CallReader:
    """One sequence's tool calls: the text of each, collected while the model writes it,
    and read at its end. ``forced``: the whole output is the call, as JSON (see above)."""

    def __init__(
        self, tokenizer: Any, tools: list[dict[str, Any]], forced: bool, named: str | None
    ) -> None:
        self._parse = tokenizer.tool_parser
        self._markers = (tokenizer.tool_call_start or "", tokenizer.tool_call_end or "")
        self._tools = tools
        self.forced = forced
        self._named = named
        self._text: list[str] = []

    def feed(self, text: str) -> None:
        self._text.append(text)

    def close(self, ended: bool = True) -> tuple[list[ToolCall], str]:
        """The end of a call's text (``ended``: by its end marker, not the output's end):
        the calls it holds, or none and the text back, as written, when it does not read
        as calls (cut off by ``max_tokens``, or not in the model's format)."""
        text = "".join(self._text)
        self._text = []
        try:
            calls = self._forced_calls(text) if self.forced else self._parsed_calls(text)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            calls = None
        if calls:
            return calls, ""
        if self.forced:
            return [], text
        start, end = self._markers
        return [], start + text + (end if ended else "")

    def _forced_calls(self, text: str) -> list[ToolCall] | None:
        value = json.loads(text)
        if self._named is not None:
            return [_call(self._named, value)]
        return [_call(c["name"], c["arguments"]) for c in value]

    def _parsed_calls(self, text: str) -> list[ToolCall] | None:
        parsed = self._parse(text, self._tools)
        found = parsed if isinstance(parsed, list) else [parsed]
        calls = []
        for p in found:
            arguments = p.get("arguments", p.get("parameters", {}))
            if isinstance(arguments, str):  # some models write the arguments as JSON text
                arguments = json.loads(arguments)
            calls.append(_call(p["name"], arguments))
        return calls


def _call(name: Any, arguments: Any) -> ToolCall:
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        raise ValueError("not a call: a name and an object of arguments")
    return ToolCall(id=new_call_id(), name=name, arguments=arguments)


def forced_constraint(fmt: JsonSchemaFormat, field: str, loaded: Any) -> Any:
    """``fmt`` (``forced_format``'s) compiled for ``loaded``; a schema that does not compile
    is refused naming the tool's ``parameters``."""
    try:
        return constraint_for(fmt, loaded)
    except InvalidField as exc:
        raise InvalidField(field, str(exc)) from None
