"""A sequence's generated text split into reasoning and answer, at the model's thinking
markers, once in the engine for every front end; and the template switches for thinking.

A model thinks when mlx-lm's tokenizer wrapper finds thinking markers in its vocabulary
(``has_thinking``, ``think_start``/``think_end``). Its output is then two channels: text
between ``think_start`` and ``think_end`` is reasoning (``Chunk.reasoning``), the rest is
the answer (``Chunk.text``); the markers themselves are in neither. A sequence starts in
reasoning when its prompt leaves a think block open (a template that opens ``<think>`` in
the generation prompt, as Qwen3's thinking templates do), as mlx-lm's server decides.

Single-token markers (all of mlx-lm's ``<think>`` families) are found by token id, so text
that merely spells a marker is never taken for one; the detokenizer is flushed at a
marker, so each side gets exactly its own text. Multi-token markers (Gemma 4's channel,
XTML) go through mlx-lm's own ``TextStateMachine`` on the text.

Threading: ``Split`` runs on the worker thread (it owns the sequence's detokenizer);
``template_switches`` on the worker or tokenizer thread (it only reads the tokenizer).
"""

from __future__ import annotations

from typing import Any

from mlx_lm.generate import TextStateMachine

from mlxd.protocol import Generate

from .sampling import InvalidField


class Split:
    """One sequence's detokenizer, and which channel its text goes to."""

    def __init__(self, tokenizer: Any, prompt: list[int]) -> None:
        self.detokenizer = tokenizer.detokenizer
        self._ids: tuple[int, int] | None = None
        self._machine: Any = None
        self.reasoning = False
        if not tokenizer.has_thinking:
            return
        self.reasoning = tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt)
        start, end = tokenizer.think_start_tokens, tokenizer.think_end_tokens
        if len(start) == 1 and len(end) == 1:
            self._ids = (start[0], end[0])
        else:
            machine = TextStateMachine(
                {"normal": [(tokenizer.think_start, "reasoning")],
                 "reasoning": [(tokenizer.think_end, "normal")]}
            )  # fmt: skip
            self._machine = machine.make_state("reasoning" if self.reasoning else "normal")

    def add(self, token: int) -> tuple[str, str]:
        """Take one generated token: the (reasoning, answer) text now safe to release."""
        if self._ids is not None and token == self._ids[self.reasoning]:
            # Entering or leaving a think block: what the detokenizer held is the old side's.
            self.detokenizer.finalize()
            flushed = self._side(self.detokenizer.last_segment)
            self.reasoning = not self.reasoning
            return flushed
        self.detokenizer.add_token(token)
        return self._side(self.detokenizer.last_segment)

    def finish(self) -> tuple[str, str]:
        """The end of the sequence: the text still held back."""
        self.detokenizer.finalize()
        out = self._side(self.detokenizer.last_segment)
        if self._machine is not None:
            self._machine, held, state = TextStateMachine.flush(self._machine)
            more = (held, "") if state == "reasoning" else ("", held)
            out = (out[0] + more[0], out[1] + more[1])
        return out

    def _side(self, text: str) -> tuple[str, str]:
        if self._machine is None:
            return (text, "") if self.reasoning else ("", text)
        self._machine, segments = TextStateMachine.split(self._machine, text)
        self.reasoning = self._machine[0] == "reasoning"
        reasoning = "".join(t for s, t in segments if s == "reasoning")
        return reasoning, "".join(t for s, t in segments if s != "reasoning")


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
