"""A sequence's generated text split into its channels at the model's markers, once in the
engine for every front end: reasoning, answer, and tool calls.

A model thinks when mlx-lm's tokenizer wrapper finds thinking markers in its vocabulary
(``has_thinking``, ``think_start``/``think_end``): text between them is reasoning
(``Chunk.reasoning``). A request that offers tools reads the text between the model's
tool-call markers (``tool_call_start``/``tool_call_end``) as calls (daemon/tools.py), which
come back parsed in ``Chunk.tool_calls``. The rest is the answer (``Chunk.text``); the
markers themselves are in none. The transitions are mlx-lm's server's: a call may start
in the answer or in the reasoning and goes back to the answer. A sequence starts in
reasoning when its prompt leaves a think block open (a template that opens ``<think>`` in
the generation prompt, as Qwen3's thinking templates do), as mlx-lm's server decides; a
forced call (``tool_choice`` ``required`` or a function) is all call, from the start.

Where every marker is one token (all of mlx-lm's ``<think>`` and ``<tool_call>``
families) they are found by token id, so text that merely spells a marker is never taken
for one; the detokenizer is flushed at a marker, so each side gets exactly its own text.
Multi-token markers (Gemma 4's channel, XTML) go through mlx-lm's own ``TextStateMachine``
on the text.

Threading: worker thread only (``Split`` owns its sequence's detokenizer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from mlx_lm.generate import TextStateMachine

from mlxd.protocol import ToolCall

from .tools import CallReader

NORMAL, REASONING, TOOL = "normal", "reasoning", "tool"


class Piece(NamedTuple):
    """What one token (or the end) releases: reasoning text, answer text, and the calls it
    completed."""

    reasoning: str = ""
    text: str = ""
    calls: list[ToolCall] | None = None

    def __add__(self, other: Piece) -> Piece:  # type: ignore[override]
        calls = self.calls if not other.calls else [*(self.calls or []), *other.calls]
        return Piece(self.reasoning + other.reasoning, self.text + other.text, calls)


EMPTY = Piece()


class Split:
    """One sequence's detokenizer, which channel its text goes to, and its call reader."""

    def __init__(self, tokenizer: Any, prompt: list[int], calls: CallReader | None = None) -> None:
        self.detokenizer = tokenizer.detokenizer
        self.calls = calls
        # (from, marker text, marker tokens, to), as mlx-lm's make_text_state_machine.
        edges: list[tuple[str, str, Any, str]] = []
        self.channel = NORMAL
        if tokenizer.has_thinking:
            edges += [
                (NORMAL, tokenizer.think_start, tokenizer.think_start_tokens, REASONING),
                (REASONING, tokenizer.think_end, tokenizer.think_end_tokens, NORMAL),
            ]
            if tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
                self.channel = REASONING
        if calls is not None and calls.forced:
            self.channel, edges = TOOL, []
        elif calls is not None:
            start = (tokenizer.tool_call_start, tokenizer.tool_call_start_tokens)
            edges += [(NORMAL, *start, TOOL)]
            if tokenizer.has_thinking:
                edges += [(REASONING, *start, TOOL)]
            if tokenizer.tool_call_end:  # else a call runs to the end of the output
                edges += [(TOOL, tokenizer.tool_call_end, tokenizer.tool_call_end_tokens, NORMAL)]
        self._ids: dict[tuple[str, int], str] | None = None
        self._machine: Any = None
        if all(len(tokens or ()) == 1 for _, _, tokens, _ in edges):
            self._ids = {(src, tokens[0]): dst for src, _, tokens, dst in edges}
        else:
            transitions: dict[str, list[tuple[str, str]]] = {}
            for src, text, _, dst in edges:
                transitions.setdefault(src, []).append((text, dst))
            self._machine = TextStateMachine(transitions).make_state(self.channel)

    def add(self, token: int) -> Piece:
        """Take one generated token: what is now safe to release."""
        if self._ids is not None and (to := self._ids.get((self.channel, token))) is not None:
            # A marker: what the detokenizer held is the old channel's.
            self.detokenizer.finalize()
            return self._enter(to, self._take(self.detokenizer.last_segment))
        self.detokenizer.add_token(token)
        return self._take(self.detokenizer.last_segment)

    def finish(self) -> Piece:
        """The end of the sequence: the text still held back, and a call still open (a
        forced one, or one the output ended inside of) read."""
        self.detokenizer.finalize()
        piece = self._take(self.detokenizer.last_segment)
        if self._machine is not None:
            self._machine, held, state = TextStateMachine.flush(self._machine)
            piece += self._route(state, held)
        if self.channel == TOOL:
            piece = self._enter(NORMAL, piece, ended=False)
        return piece

    def _take(self, text: str) -> Piece:
        if self._machine is None:
            return self._route(self.channel, text)
        self._machine, segments = TextStateMachine.split(self._machine, text)
        piece = EMPTY
        for state, segment in segments:
            if state != self.channel:  # a marker between this segment and the last
                piece = self._enter(state, piece)
            piece += self._route(state, segment)
        return piece

    def _route(self, channel: str, text: str) -> Piece:
        if not text:
            return EMPTY
        if channel == NORMAL:
            return Piece(text=text)
        if channel == REASONING:
            return Piece(reasoning=text)
        assert self.calls is not None
        self.calls.feed(text)
        return EMPTY

    def _enter(self, channel: str, piece: Piece, ended: bool = True) -> Piece:
        if self.channel == TOOL and self.calls is not None:
            calls, text = self.calls.close(ended)
            piece += Piece(text=text, calls=calls or None)
        self.channel = channel
        return piece
