"""OpenAI logprobs through the official ``openai`` SDK, against a real daemon: chat
completions' ``logprobs.content`` and legacy completions' ``logprobs``, streamed and not,
solo and in a batch of concurrent requests, equal mlx-lm's log-softmax computed in this
process; a stream whose events were merged still carries every token's, in order."""

from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import HttpDaemon, short_tmpdir, start_daemon
from helpers import UnreadHttpStream, _load, chat_tokens, reference, reference_logprobs, wait_for

PROMPT = "def parse(line):\n"
CHAT = [{"role": "user", "content": "Say something about sockets."}]
REL = ABS = 2**-6  # a few bfloat16 ulps: cached decode steps against one forward pass


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=ABS)


@pytest.fixture
def sdk(http_daemon: HttpDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http_daemon.base_url}/v1", api_key="unused", max_retries=0)


def token_bytes(model_dir: Path, ids: list[int]) -> list[bytes]:
    """Each token's own bytes (byte-level BPE), independently of the daemon."""
    from mlx_lm.tokenizer_utils import _byte_decoder

    _, tokenizer = _load(str(model_dir))
    return [bytes(_byte_decoder()[c] for c in tokenizer.convert_ids_to_tokens(i)) for i in ids]


def check_chat(model_dir: Path, content: list[Any], k: int) -> None:
    prompt = chat_tokens(model_dir, CHAT)
    _, ids = reference(model_dir, prompt, len(content))
    rows = reference_logprobs(model_dir, prompt, ids)
    assert len(content) == len(ids)
    for entry, row, token, raw in zip(content, rows, ids, token_bytes(model_dir, ids), strict=True):
        assert close(entry.logprob, row[token]), (entry.logprob, row[token])
        assert bytes(entry.bytes) == raw
        assert entry.token == raw.decode() or entry.token.startswith("bytes:")
        assert len(entry.top_logprobs) == k
        for alt, want in zip(entry.top_logprobs, sorted(row, reverse=True), strict=False):
            assert close(alt.logprob, want)
        if k:  # greedy: the token is the most likely one
            assert entry.top_logprobs[0].bytes == entry.bytes


def test_chat_logprobs_whole_and_streamed(sdk: openai.OpenAI, tiny_model: Path) -> None:
    options: dict[str, Any] = {"model": "tiny", "messages": CHAT, "max_tokens": 12,
                               "temperature": 0, "logprobs": True, "top_logprobs": 3}  # fmt: skip
    whole = sdk.chat.completions.create(**options)
    content = whole.choices[0].logprobs.content
    check_chat(tiny_model, content, 3)
    assert "".join(c.token for c in content).startswith(whole.choices[0].message.content)
    streamed = []
    for event in sdk.chat.completions.create(**options, stream=True):
        if event.choices and event.choices[0].logprobs is not None:
            streamed += event.choices[0].logprobs.content
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    plain = sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)
    assert plain.choices[0].logprobs is None


def check_completion(model_dir: Path, logprobs: Any, text: str, k: int) -> None:
    _, tokenizer = _load(str(model_dir))
    prompt = tokenizer.encode(PROMPT)
    _, ids = reference(model_dir, PROMPT, len(logprobs.tokens))
    rows = reference_logprobs(model_dir, prompt, ids)
    raws = token_bytes(model_dir, ids)
    assert len(logprobs.token_logprobs) == len(ids) == len(logprobs.text_offset)
    offset = 0
    for i, (row, token, raw) in enumerate(zip(rows, ids, raws, strict=True)):
        assert close(logprobs.token_logprobs[i], row[token])
        assert logprobs.text_offset[i] == offset
        offset += len(raw.decode(errors="replace"))
        top = logprobs.top_logprobs[i]
        assert len(top) == k
        for got, want in zip(
            sorted(top.values(), reverse=True), sorted(row, reverse=True), strict=False
        ):
            assert close(got, want)
    assert b"".join(raws).decode(errors="replace").startswith(text)


def test_completion_logprobs_whole_and_streamed(sdk: openai.OpenAI, tiny_model: Path) -> None:
    options: dict[str, Any] = {
        "model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 2
    }  # fmt: skip
    whole = sdk.completions.create(**options)
    check_completion(tiny_model, whole.choices[0].logprobs, whole.choices[0].text, 2)
    tokens, values, offsets, text = [], [], [], ""
    for event in sdk.completions.create(**options, stream=True):
        if event.choices:
            text += event.choices[0].text
            if event.choices[0].logprobs is not None:
                tokens += event.choices[0].logprobs.tokens
                values += event.choices[0].logprobs.token_logprobs
                offsets += event.choices[0].logprobs.text_offset
    got = whole.choices[0].logprobs
    assert (tokens, values, offsets) == (got.tokens, got.token_logprobs, got.text_offset)
    assert text == whole.choices[0].text


def test_logprobs_of_concurrent_requests(sdk: openai.OpenAI, tiny_model: Path) -> None:
    def one(i: int) -> None:
        if i % 2:
            stream = sdk.chat.completions.create(
                model="tiny", messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                top_logprobs=i, stream=(i % 4 == 1),
            )  # fmt: skip
            if i % 4 == 1:
                content = [c for e in stream if e.choices and e.choices[0].logprobs
                           for c in e.choices[0].logprobs.content]  # fmt: skip
            else:
                content = stream.choices[0].logprobs.content
            check_chat(tiny_model, content, i)
        else:
            got = sdk.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=i
            )
            check_completion(tiny_model, got.choices[0].logprobs, got.choices[0].text, i)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
    ],
)
def test_out_of_range_logprobs_are_400_naming_the_field(
    sdk: openai.OpenAI, endpoint: str, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, **body)
        else:
            sdk.completions.create(model="tiny", prompt="x", max_tokens=2, **body)
    assert info.value.body["param"] == param  # type: ignore[index]


def test_a_merged_stream_carries_every_tokens_logprobs(tiny_model: Path) -> None:
    """Unread, the stream's events pile up and go out merged, several tokens in one."""
    base = short_tmpdir()
    http = base / "http" / "mlxd-http.sock"
    d = start_daemon(
        base / "mlxd.sock", "--model", f"tiny={tiny_model}", "--default-model", "tiny",
        "--http", f"unix:{http}",
    )  # fmt: skip
    try:
        _, tokenizer = _load(str(tiny_model))
        bias = {t: -100.0 for t in tokenizer.eos_token_ids}  # it runs to max_tokens
        logit_bias = {str(t): b for t, b in bias.items()}
        request = {"prompt": PROMPT, "max_tokens": 1500, "stream": True, "temperature": 0,
                   "logprobs": 20, "logit_bias": logit_bias}  # fmt: skip
        stream = UnreadHttpStream(http, "/v1/completions", request)
        with d.client() as c:
            wait_for(c, lambda s: s.sequences_preempted >= 1)
        events = stream.events()
        lps = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
        assert any(len(lp["tokens"]) > 1 for lp in lps), "nothing was merged"
        values = [v for lp in lps for v in lp["token_logprobs"]]
        tops = [t for lp in lps for t in lp["top_logprobs"]]
        offsets = [o for lp in lps for o in lp["text_offset"]]
        assert len(values) == len(tops) == len(offsets) == 1500
        assert offsets == sorted(offsets)
        ids = tokenizer.encode(PROMPT)
        rows = reference_logprobs(tiny_model, ids, _ids_of(tokenizer, lps), bias)
        for row, value, top in zip(rows, values, tops, strict=True):
            assert close(value, max(row))  # greedy: the most likely token
            assert len(top) == 20 and close(max(top.values()), max(row))
        assert d.stop() == 0, d.log()
    finally:
        if d.proc.poll() is None:
            d.stop(9)
        shutil.rmtree(base, ignore_errors=True)


def _ids_of(tokenizer: Any, lps: list[dict[str, Any]]) -> list[int]:
    """The generated ids, from the token strings: each a token of the vocabulary."""
    from mlx_lm.tokenizer_utils import _byte_decoder

    encoder = {bytes(_byte_decoder()[c] for c in t): i for t, i in tokenizer.get_vocab().items()
               if all(c in _byte_decoder() for c in t)}  # fmt: skip
    out = []
    for lp in lps:
        for token in lp["tokens"]:
            if token.startswith("bytes:"):
                data = bytes.fromhex(token[6:].replace("\\x", ""))
            else:
                data = token.encode()
            out.append(encoder[data])
    return out


def test_ollama_logprobs_generate_and_chat(http_daemon: HttpDaemon, tiny_model: Path) -> None:
    import ollama

    client = ollama.Client(host=http_daemon.base_url, timeout=120)
    options = {"temperature": 0, "num_predict": 10}
    whole = client.generate(
        model="tiny", prompt=PROMPT, raw=True, options=options, logprobs=True, top_logprobs=2
    )
    assert whole.logprobs is not None
    _, tokenizer = _load(str(tiny_model))
    _, ids = reference(tiny_model, PROMPT, len(whole.logprobs))
    rows = reference_logprobs(tiny_model, tokenizer.encode(PROMPT), ids)
    raws = token_bytes(tiny_model, ids)
    for entry, row, token, raw in zip(whole.logprobs, rows, ids, raws, strict=True):
        assert close(entry.logprob, row[token]) and entry.token == raw.decode(errors="replace")
        assert entry.top_logprobs is not None and len(entry.top_logprobs) == 2
        assert close(entry.top_logprobs[0].logprob, max(row))
    parts = client.chat(
        model="tiny", messages=CHAT, options=options, logprobs=True, top_logprobs=1, stream=True
    )
    streamed = [lp for part in parts for lp in part.logprobs or []]
    prompt = chat_tokens(tiny_model, CHAT)
    _, ids = reference(tiny_model, prompt, len(streamed))
    rows = reference_logprobs(tiny_model, prompt, ids)
    assert len(streamed) == len(ids)
    for entry, row, token in zip(streamed, rows, ids, strict=True):
        assert close(entry.logprob, row[token])
    plain = client.generate(model="tiny", prompt=PROMPT, raw=True, options=options)
    assert plain.logprobs is None
