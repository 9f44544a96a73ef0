"""The chat template's switches for thinking: ``think`` and ``reasoning_effort``.

A thinking model's output is split into reasoning and answer by daemon/channels.py; these
switches only reach its template, where it takes them, and refuse what it cannot honour.

Threading: the worker or tokenizer thread (it only reads the request and the tokenizer).
"""

from __future__ import annotations

from typing import Any

from mlxd.protocol import Generate

from .sampling import InvalidField


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else ""


def template_switches(req: Generate, tokenizer: Any, model: str) -> dict[str, Any]:
    """The chat template's keyword arguments for ``req.think`` and ``req.reasoning_effort``;
    raises ``InvalidField`` where the model or its template cannot honour them (never
    ignored in silence)."""
    kwargs: dict[str, Any] = {}
    if req.think is None and req.reasoning_effort is None:
        return kwargs
    field = "$.think" if req.think is not None else "$.reasoning_effort"
    if req.messages is None:
        raise InvalidField(field, "think and reasoning_effort go with messages (the chat template)")
    template = _template_text(tokenizer)
    if req.think is not None:
        if req.think and not tokenizer.has_thinking:
            raise InvalidField("$.think", f"model {model!r} does not support thinking")
        if not req.think and tokenizer.has_thinking:
            if "enable_thinking" not in template:
                raise InvalidField(
                    "$.think", f"the chat template of model {model!r} cannot turn thinking off"
                )
            kwargs["enable_thinking"] = False
    if req.reasoning_effort is not None:
        if "reasoning_effort" not in template:
            raise InvalidField(
                "$.reasoning_effort",
                f"the chat template of model {model!r} takes no reasoning_effort",
            )
        kwargs["reasoning_effort"] = req.reasoning_effort
    return kwargs
