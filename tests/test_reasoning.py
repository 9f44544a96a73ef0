"""Test models with mlx-lm's tool-call and thinking markers, and the reasoning split: a
thinking model's reasoning streamed apart from its answer, through the native protocol,
the ``openai`` SDK and the ``ollama`` SDK, checked against mlx-lm's own parsing
(``TextStateMachine``) of the same greedy tokens computed in this process.

A random-weight model does not end its thinking by itself: ``logit_bias`` on ``</think>``
(the same for the daemon and the reference) makes it do so part way through.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
from conftest import Daemon, HttpDaemon, start_http_daemon
from helpers import _load

from mlxd.client import Chunk, InvalidRequestError
from mlxd.daemon.demo_model import build_demo_model

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def think_daemon(qwen3_model: Path, tiny_model: Path) -> Iterator[HttpDaemon]:
    d = start_http_daemon(
        "--model", f"qwen3={qwen3_model}", "--model", f"tiny={tiny_model}",
        "--default-model", "qwen3",
    )  # fmt: skip
    yield d
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert code == 0, d.log()


# ----------------------------------------------------------------- the marker models


@pytest.mark.parametrize(
    ("markers", "thinking", "parser"),
    [("qwen3", ("<think>", "</think>"), "qwen3_coder"), ("hermes", None, "json_tools")],
)
def test_marker_models_are_detected_by_mlx_lm(
    models_root: Path, markers: str, thinking: tuple[str, str] | None, parser: str
) -> None:
    from mlx_lm import load

    path = build_demo_model(models_root / f"tiny-{markers}", size="tiny", markers=markers)
    _, tokenizer = load(str(path))
    assert tokenizer.has_thinking == (thinking is not None)
    if thinking is not None:
        assert (tokenizer.think_start, tokenizer.think_end) == thinking
        # One special token each, so the split can go by token id.
        assert len(tokenizer.think_start_tokens) == len(tokenizer.think_end_tokens) == 1
    assert tokenizer.has_tool_calling
    assert tokenizer.tool_parser.__module__ == f"mlx_lm.tool_parsers.{parser}"
    assert len(tokenizer.tool_call_start_tokens) == 1
    # The template renders a tool call in the family's format, which its parser reads back.
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    text = tokenizer.apply_chat_template(history, tokenize=False)
    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
    inside = text[text.index(start) + len(start) : text.index(end)]
    parsed = tokenizer.tool_parser(inside, [{"type": "function", **call}])
    assert parsed["name"] == "get_weather" and parsed["arguments"] == {"city": "Paris"}


def test_plain_builds_keep_their_fingerprint(tiny_model: Path, models_root: Path) -> None:
    # The variants add to the fingerprint only when set: existing plain builds stay valid.
    assert '"markers"' not in (tiny_model / "mlxd_demo.json").read_text()
    with pytest.raises(ValueError, match="unknown demo model markers"):
        build_demo_model(models_root / "bad", size="tiny", markers="nope")


# ----------------------------------------------------------------- the reference


def _messages(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@functools.cache
def _reference(model_dir: str, content: str, bias: float | None) -> tuple[str, str, list[int]]:
    """(reasoning, answer, tokens) of mlx-lm's greedy reply, split by mlx-lm's server's
    own machinery: its TextStateMachine over the streamed text, starting in reasoning
    when the prompt leaves a think block open."""
    import mlx.core as mx
    from mlx_lm.generate import TextStateMachine, generate_step, make_text_state_machine
    from mlx_lm.sample_utils import make_logits_processors

    model, tokenizer = _load(model_dir)
    prompt = tokenizer.apply_chat_template(_messages(content), add_generation_prompt=True)
    opened = tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt)
    state = make_text_state_machine(tokenizer).make_state("reasoning" if opened else "normal")
    bias_map = {tokenizer.think_end_id: bias} if bias is not None else None
    processors = make_logits_processors(logit_bias=bias_map)
    detok = tokenizer.detokenizer
    parts: dict[str | None, list[str]] = {"reasoning": [], "normal": []}
    tokens: list[int] = []
    steps = generate_step(mx.array(prompt), model, logits_processors=processors)
    for (token, _), _ in zip(steps, range(MAX_TOKENS), strict=False):
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
        detok.add_token(token)
        state, segments = TextStateMachine.split(state, detok.last_segment)
        for name, text in segments:
            parts.setdefault(name, []).append(text)
    detok.finalize()
    state, segments = TextStateMachine.split(state, detok.last_segment)
    for name, text in segments:
        parts.setdefault(name, []).append(text)
    state, held, name = TextStateMachine.flush(state)
    parts.setdefault(name, []).append(held)
    return "".join(parts["reasoning"]), "".join(parts["normal"]), tokens


@functools.cache
def _case(model_dir: str) -> tuple[str, float, str, str]:
    """A prompt and a bias on ``</think>`` under which the greedy reply thinks a while,
    ends its thinking once, and answers at some length: (content, bias, reasoning, answer)."""
    _, tokenizer = _load(model_dir)
    end = tokenizer.think_end_id
    for content in ["What is MLX?", "hi", "Explain sockets.", "def main():"]:
        for bias in (9.0, 9.5, 10.0, 10.5, 11.0):
            reasoning, answer, tokens = _reference(model_dir, content, bias)
            if tokens.count(end) == 1 and tokens.index(end) >= 4 and len(answer.strip()) >= 12:
                return content, bias, reasoning, answer
    raise AssertionError("no prompt and bias make the model end its thinking once")


def _stop_in(answer: str) -> str:
    """A stop string the answer contains, well after its start."""
    for at in range(len(answer) // 2, len(answer) - 2):
        stop = answer[at : at + 3]
        if stop.strip() and answer.find(stop) >= 4:
            return stop
    raise AssertionError(f"no stop string in {answer!r}")


# ----------------------------------------------------------------- the split


def test_native_split_streamed_with_a_stop_in_the_answer(
    think_daemon: Daemon, qwen3_model: Path
) -> None:
    content, bias, reasoning, answer = _case(str(qwen3_model))
    stop = _stop_in(answer)
    end_id = _load(str(qwen3_model))[1].think_end_id
    with think_daemon.client() as client:
        whole = client.chat(_messages(content), max_tokens=MAX_TOKENS, logit_bias={end_id: bias})
        assert (whole.reasoning, whole.text) == (reasoning, answer)
        chunks = [
            m
            for m in client.stream(
                messages=_messages(content),
                max_tokens=MAX_TOKENS,
                logit_bias={end_id: bias},
                stop=[stop],
            )
        ]
    done = chunks.pop()
    assert all(isinstance(c, Chunk) for c in chunks)
    assert "".join(c.reasoning for c in chunks) == reasoning
    assert "".join(c.text for c in chunks) == answer[: answer.find(stop)]
    # The reasoning comes first, whole; no chunk mixes in a marker.
    first_answer = next(i for i, c in enumerate(chunks) if c.text)
    assert all(not c.reasoning for c in chunks[first_answer:])
    assert not any("think>" in c.text + c.reasoning for c in chunks)
    assert done.finish_reason == "stop" and done.stop_sequence == stop


def test_native_reasoning_runs_to_max_tokens(think_daemon: Daemon, qwen3_model: Path) -> None:
    # No bias: the model never ends its thinking; all of max_tokens is reasoning.
    reasoning, answer, tokens = _reference(str(qwen3_model), "hi", None)
    assert answer == "" and len(tokens) == MAX_TOKENS
    with think_daemon.client() as client:
        done = client.chat(_messages("hi"), max_tokens=MAX_TOKENS)
    assert (done.reasoning, done.text, done.tokens) == (reasoning, "", tokens)
    assert done.done.finish_reason == "length"


def test_openai_reasoning_content_streamed_and_not(
    think_daemon: HttpDaemon, qwen3_model: Path
) -> None:
    content, bias, reasoning, answer = _case(str(qwen3_model))
    stop = _stop_in(answer)
    end_id = _load(str(qwen3_model))[1].think_end_id
    sdk = openai.OpenAI(base_url=f"{think_daemon.base_url}/v1", api_key="unused", max_retries=0)
    args: dict[str, Any] = dict(
        model="qwen3",
        messages=_messages(content),
        max_tokens=MAX_TOKENS,
        logit_bias={str(end_id): bias},
        stop=[stop],
    )
    reply = sdk.chat.completions.create(**args)
    message = reply.choices[0].message
    assert message.content == answer[: answer.find(stop)]
    assert message.reasoning_content == reasoning  # type: ignore[attr-defined]
    assert reply.choices[0].finish_reason == "stop"
    thought, said = [], []
    for chunk in sdk.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            said.append(choice.delta.content or "")
            thought.append(getattr(choice.delta, "reasoning_content", None) or "")
    assert ("".join(thought), "".join(said)) == (reasoning, answer[: answer.find(stop)])
    # A model without thinking markers: no reasoning_content at all.
    plain = sdk.chat.completions.create(model="tiny", messages=_messages("hi"), max_tokens=4)
    assert "reasoning_content" not in (plain.choices[0].message.model_extra or {})


def test_openai_reasoning_effort_reaches_the_template(think_daemon: HttpDaemon) -> None:
    sdk = openai.OpenAI(base_url=f"{think_daemon.base_url}/v1", api_key="unused", max_retries=0)
    prompt_tokens = {}
    for effort in (None, "high"):
        extra = {} if effort is None else {"reasoning_effort": effort}
        reply = sdk.chat.completions.create(
            model="qwen3", messages=_messages("hi"), max_tokens=1, **extra
        )
        assert reply.usage is not None
        prompt_tokens[effort] = reply.usage.prompt_tokens
    # The template adds a "Reasoning: high" system turn.
    assert prompt_tokens["high"] > prompt_tokens[None]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="tiny", messages=_messages("hi"), max_tokens=1, reasoning_effort="low"
        )
    assert "takes no reasoning_effort" in str(caught.value)


def test_ollama_thinking_and_think_false(think_daemon: HttpDaemon, qwen3_model: Path) -> None:
    reasoning, _, _ = _reference(str(qwen3_model), "hi", None)
    client = ollama.Client(host=think_daemon.base_url, timeout=120)
    options = {"num_predict": MAX_TOKENS}
    reply = client.chat(model="qwen3", messages=_messages("hi"), options=options)
    assert reply.message.thinking == reasoning and reply.message.content == ""
    streamed = list(
        client.chat(model="qwen3", messages=_messages("hi"), options=options, stream=True)
    )
    assert "".join(p.message.thinking or "" for p in streamed) == reasoning
    # think false: the template closes the think block in the prompt; all is answer.
    off = client.chat(model="qwen3", messages=_messages("hi"), options=options, think=False)
    assert not off.message.thinking and off.message.content
    _, tokenizer = _load(str(qwen3_model))
    closed = tokenizer.apply_chat_template(
        _messages("hi"), add_generation_prompt=True, enable_thinking=False
    )
    assert off.prompt_eval_count == len(closed)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="tiny", messages=_messages("hi"), think=True)
    assert caught.value.status_code == 400
    assert "does not support thinking" in str(caught.value)


def test_native_think_refusals(think_daemon: Daemon) -> None:
    with think_daemon.client() as client:
        with pytest.raises(InvalidRequestError) as caught:
            client.chat(_messages("hi"), model="tiny", think=True, max_tokens=1)
        assert caught.value.field == "$.think"
        assert "does not support thinking" in str(caught.value)
        with pytest.raises(InvalidRequestError) as caught:
            client.generate("hi", model="qwen3", think=False, max_tokens=1)
        assert caught.value.field == "$.think"
        # think false on a model without thinking has nothing to turn off: served.
        assert client.chat(_messages("hi"), model="tiny", think=False, max_tokens=2).text
