"""OpenAI's logprobs shapes, from the native chunks' ``TokenLogprob``\\s: chat completions'
``choices[].logprobs.content`` and legacy completions' ``tokens``/``token_logprobs``/
``top_logprobs``/``text_offset``. One ``LogprobShaper`` per response: it keeps the text
offset across a stream's chunks.

A token's string is its bytes as UTF-8, or, when they are not valid UTF-8 alone (part of
a multi-byte character), ``bytes:`` and their ``\\xNN`` escapes, as OpenAI writes them.

Threading: event loop only; never calls MLX.
"""

from __future__ import annotations

import codecs

from msgspec import Struct

from mlxd.protocol import TokenLogprob, TopLogprob


class TopContent(Struct):
    token: str
    logprob: float
    bytes: list[int]


class Content(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopContent]


class ChatLogprobs(Struct):
    content: list[Content]
    refusal: None = None


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


def token_string(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _top(alt: TopLogprob) -> TopContent:
    return TopContent(token_string(alt.bytes), alt.logprob, list(alt.bytes))


class LogprobShaper:
    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0

    def chat(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        content = [
            Content(
                token_string(e.bytes),
                e.logprob,
                list(e.bytes),
                [_top(a) for a in e.top_logprobs],
            )
            for e in entries
        ]
        return ChatLogprobs(content)

    def completion(self, entries: list[TokenLogprob]) -> CompletionLogprobs:
        offsets = []
        for e in entries:
            offsets.append(self._offset)  # characters of the completion before this token
            self._offset += len(self._text.decode(e.bytes))
        return CompletionLogprobs(
            [token_string(e.bytes) for e in entries],
            [e.logprob for e in entries],
            [{token_string(a.bytes): a.logprob for a in e.top_logprobs} for e in entries],
            offsets,
        )
