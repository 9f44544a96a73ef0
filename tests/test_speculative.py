"""Speculative decoding (daemon/speculative.py) through a real daemon: prompt lookup and a
draft model give plain decoding's greedy tokens, keep the sampling distribution at
temperature > 0, and leave cancel, stop strings, max_tokens and the prompt cache as they
are without speculation.

The draft-model tests use the tiny model as its own draft (every greedy proposal is
right: the accepting path) and the other tiny model (almost every proposal is wrong: the
rejecting path).
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, short_tmpdir, start_daemon, wait_idle
from helpers import reference

from mlxd.client import Chunk, InvalidRequestError

# Code that repeats itself, as edits and completions do: prompt lookup has something to copy.
PROMPTS = [f"def f{i}(x):\n    return x + {i}\n\ndef f{i}(x):\n    return" for i in range(5)] + [
    "import os\nimport sys\nimport os\nimport",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n",
    "a b c d a b c d a b c d a b",
    "class A:\n    def __init__(self):\n        self.x = 1\nclass B:\n    def __init__(self):\n",
    "x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6",
    "hello world hello world hello",
    "if a:\n    b()\nelif c:\n    d()\nif a:\n    b()\n",
    "1 + 1 = 2\n2 + 2 = 4\n3 + 3 = 6\n4 + 4 =",
    "the cat sat on the mat. the cat sat on the",
    "SELECT * FROM t WHERE a = 1;\nSELECT * FROM t WHERE",
    "<div><p>hi</p></div>\n<div><p>",
    "foo(bar(baz(1)))\nfoo(bar(",
    "try:\n    x()\nexcept E:\n    pass\ntry:\n",
    "while True:\n    break\nwhile True:\n",
    "return self.x + self.y\nreturn self.",
]
MAX_TOKENS = 24
LOOKUP = "prompt_lookup"


@pytest.fixture(scope="module")
def spec_daemon(tiny_model: Path) -> Iterator[Daemon]:
    d = start_daemon(short_tmpdir() / "mlxd.sock", "--model", f"tiny={tiny_model}")
    yield d
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    assert code == 0, d.log()


@pytest.fixture(scope="module")
def draft_daemon(tiny_model: Path, tiny_model_b: Path, models_root: Path) -> Iterator[Daemon]:
    """ "self": the tiny model drafting for itself; "other": the other tiny model drafting
    for it, by default; "mismatch": a draft with another vocabulary."""
    from mlxd.daemon.demo_model import build_demo_model

    small = build_demo_model(models_root / "small", size="small")
    folder = short_tmpdir()
    config = folder / "config.toml"
    config.write_text(
        f'[models]\ntiny = "{tiny_model}"\nself = "{tiny_model}"\nother = "{tiny_model}"\n'
        f'tiny-b = "{tiny_model_b}"\nsmall = "{small}"\nmismatch = "{tiny_model}"\n\n'
        '[model_options.self]\ndraft = "tiny"\n\n'
        '[model_options.other]\ndraft = "tiny-b"\nspeculative = "draft"\nnum_draft_tokens = 3\n\n'
        '[model_options.mismatch]\ndraft = "small"\n'
    )
    d = start_daemon(folder / "mlxd.sock", env={"MLXD_CONFIG": str(config)})
    yield d
    code = d.stop()
    shutil.rmtree(folder, ignore_errors=True)
    assert code == 0, d.log()


def _tokens(d: Daemon, prompt: str, **options: Any) -> tuple[list[int], Any]:
    with d.client() as c:
        r = c.generate(prompt, max_tokens=MAX_TOKENS, cache=False, **options)
    return r.tokens, r.done


def test_prompt_lookup_greedy_output_is_plain_decoding_s(
    spec_daemon: Daemon, tiny_model: Path
) -> None:
    drafted = accepted = 0
    with spec_daemon.client() as c:
        before = c.stats()
    for prompt in PROMPTS:
        _, plain = reference(tiny_model, prompt, MAX_TOKENS)
        tokens, done = _tokens(spec_daemon, prompt, speculative="prompt_lookup")
        assert tokens == plain, prompt
        assert done.speculative.mode == "prompt_lookup"
        assert 0 <= done.speculative.accepted <= done.speculative.drafted
        drafted += done.speculative.drafted
        accepted += done.speculative.accepted
    assert drafted > 0 and accepted > 0  # both paths ran: accepting and rejecting
    with spec_daemon.client() as c:
        after = c.stats()
    assert after.tokens_drafted - before.tokens_drafted == drafted  # stats total them
    assert after.tokens_accepted - before.tokens_accepted == accepted


@pytest.mark.parametrize("model", ["self", "other"])
def test_draft_model_greedy_output_is_plain_decoding_s(
    draft_daemon: Daemon, tiny_model: Path, model: str
) -> None:
    drafted = accepted = 0
    for prompt in PROMPTS:
        _, plain = reference(tiny_model, prompt, MAX_TOKENS)
        # "other" speculates with its draft by its configuration, unasked.
        asked = {"speculative": "draft"} if model == "self" else {}
        tokens, done = _tokens(draft_daemon, prompt, model=model, **asked)
        assert tokens == plain, prompt
        assert done.speculative.mode == "draft"
        drafted += done.speculative.drafted
        accepted += done.speculative.accepted
    if model == "self":  # the model proposing its own greedy tokens: nearly all right
        assert accepted >= 0.9 * drafted > 0
    else:  # another model's: nearly all wrong, every one checked
        assert drafted > 0 and accepted < 0.5 * drafted


def test_a_draft_with_another_vocabulary_fails_the_load_saying_so(draft_daemon: Daemon) -> None:
    from mlxd.client import ModelLoadError

    with draft_daemon.client() as c:
        with pytest.raises(ModelLoadError) as info:
            c.generate("x", model="mismatch", max_tokens=2)
        assert "vocabulary" in str(info.value) and "small" in str(info.value)
        assert c.generate("x", model="tiny", max_tokens=2).done.finish_reason == "length"


def test_off_reports_nothing_and_draft_without_a_draft_model_is_refused(
    spec_daemon: Daemon,
) -> None:
    _, done = _tokens(spec_daemon, PROMPTS[0], speculative="off")
    assert done.speculative is None
    with spec_daemon.client() as c, pytest.raises(InvalidRequestError) as info:
        c.generate("x", speculative="draft", max_tokens=2)
    assert info.value.field == "$.speculative"
    with spec_daemon.client() as c, pytest.raises(InvalidRequestError) as info:
        c.generate("x", speculative="sometimes", max_tokens=2)
    assert info.value.field == "$.speculative"


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7])
def test_max_tokens_ends_a_speculative_run_where_it_ends_a_plain_one(
    spec_daemon: Daemon, max_tokens: int
) -> None:
    with spec_daemon.client() as c:
        for prompt in PROMPTS[:4]:
            plain = c.generate(prompt, max_tokens=max_tokens, cache=False)
            fast = c.generate(
                prompt, max_tokens=max_tokens, cache=False, speculative="prompt_lookup"
            )
            assert fast.tokens == plain.tokens and len(fast.tokens) == max_tokens
            assert fast.done.finish_reason == plain.done.finish_reason == "length"
            assert fast.done.usage.completion_tokens == max_tokens


def test_a_stop_string_ends_a_speculative_run_where_it_ends_a_plain_one(
    spec_daemon: Daemon,
) -> None:
    with spec_daemon.client() as c:
        for prompt in PROMPTS[:6]:
            plain = c.generate(prompt, max_tokens=MAX_TOKENS, cache=False)
            stop = plain.text[len(plain.text) // 2 :][:3]  # a string from the middle
            if not stop.strip():
                continue
            a = c.generate(prompt, max_tokens=MAX_TOKENS, cache=False, stop=[stop])
            b = c.generate(
                prompt, max_tokens=MAX_TOKENS, cache=False, stop=[stop], speculative="prompt_lookup"
            )
            assert (b.text, b.done.finish_reason, b.done.stop_sequence) == (
                a.text, a.done.finish_reason, a.done.stop_sequence,
            )  # fmt: skip
            assert b.done.usage.completion_tokens == a.done.usage.completion_tokens


def test_a_cancelled_speculative_run_leaves_a_cache_that_gives_plain_output(
    spec_daemon: Daemon, tiny_model: Path
) -> None:
    prompt = PROMPTS[6]
    with spec_daemon.client() as c:
        c.clear_cache()
        got: list[int] = []
        stream = c.stream(prompt, max_tokens=400, speculative="prompt_lookup")
        for message in stream:
            if isinstance(message, Chunk):
                got += message.tokens
                if len(got) >= 10:
                    break
        wait_idle(c)
        # The cached state (prompt and what was generated) is what plain decoding had:
        # no rejected proposal left in it.
        again = c.generate(prompt, max_tokens=MAX_TOKENS)
    _, plain = reference(tiny_model, prompt, MAX_TOKENS)
    assert got[: len(plain)] == plain[: len(got)]
    assert again.done.usage.cached_tokens > 0
    assert again.tokens == plain


def test_a_speculative_sequence_joined_by_others_goes_on_plainly(
    spec_daemon: Daemon, tiny_model: Path
) -> None:
    import threading

    prompt, other = PROMPTS[7], PROMPTS[8]
    results: dict[str, Any] = {}

    def run(name: str, text: str, **options: Any) -> None:
        with spec_daemon.client() as c:
            results[name] = c.generate(text, max_tokens=120, cache=False, **options)

    first = threading.Thread(
        target=run, args=("a", prompt), kwargs={"speculative": "prompt_lookup"}
    )
    first.start()
    with spec_daemon.client() as c:  # the second arrives once the first streams
        for message in c.stream(other, max_tokens=120, cache=False):
            if isinstance(message, Chunk):
                break
    first.join(timeout=120)
    assert results["a"].tokens == reference(tiny_model, prompt, 120)[1]


def _counts(samples: list[tuple[int, ...]]) -> Counter[tuple[int, ...]]:
    return Counter(samples)


@pytest.mark.parametrize(("model", "mode"), [("tiny", LOOKUP), ("self", "draft")])
def test_sampling_at_temperature_keeps_the_distribution(
    draft_daemon: Daemon, tiny_model: Path, model: str, mode: str
) -> None:
    """Two-sample chi-squared test on three tokens after the first, 300 seeds each, plain
    against speculative (prompt lookup; the model drafting for itself). ``logit_bias``
    leaves the model two tokens (" a", " b") to choose between, in proportions of its own,
    so proposals are often right and often wrong. For prompt lookup the test must also
    tell plain sampling apart from a wrong decoder that takes every proposal unchecked."""
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model))
    prompt = "a b a b a b a b a b a"
    ids = tokenizer.encode(prompt)
    bias = {ids[-1]: 30.0, ids[-2]: 30.0}
    n = 300

    def sample(**options: Any) -> list[list[int]]:
        with draft_daemon.client() as c:
            return [
                c.generate(
                    prompt, model=model, max_tokens=4, temperature=0.8, seed=seed,
                    cache=False, logit_bias=bias, **options,
                ).tokens
                for seed in range(n)
            ]  # fmt: skip

    plain = sample()
    fast = sample(speculative=mode)
    assert all(len(t) == 4 for t in plain + fast)
    after_first = _counts([tuple(t[1:]) for t in plain])
    assert _chi2_p(after_first, _counts([tuple(t[1:]) for t in fast])) > 1e-3
    if mode == LOOKUP:
        from mlxd.daemon.speculative import propose

        unchecked = [(t[1], *propose([*ids, *t[:2]], 2)) for t in plain]
        assert _chi2_p(after_first, _counts(unchecked)) < 1e-6


def _chi2_p(a: Counter[Any], b: Counter[Any]) -> float:
    """The p-value of a two-sample chi-squared test of equal distributions; categories
    with fewer than 10 samples in both pooled into one."""
    keys = set(a) | set(b)
    big = [k for k in keys if a[k] + b[k] >= 10]
    rows = [(a[k], b[k]) for k in big]
    rest = (sum(a[k] for k in keys if k not in big), sum(b[k] for k in keys if k not in big))
    if sum(rest):
        rows.append(rest)
    na, nb = sum(r[0] for r in rows), sum(r[1] for r in rows)
    stat = 0.0
    for x, y in rows:
        total = x + y
        for observed, n in ((x, na), (y, nb)):
            expected = total * n / (na + nb)
            stat += (observed - expected) ** 2 / expected
    dof = len(rows) - 1
    return _chi2_sf(stat, dof)


def _chi2_sf(x: float, k: int) -> float:
    """P(X > x) for X chi-squared with ``k`` degrees of freedom (the regularized upper
    incomplete gamma function, by its series; no scipy in the test dependencies)."""
    if k <= 0:
        return 1.0
    s, z = k / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    term = total = 1.0 / s
    for i in range(1, 1000):
        term *= z / (s + i)
        total += term
        if term < total * 1e-15:
            break
    lower = math.exp(-z + s * math.log(z) - math.lgamma(s)) * total
    return max(0.0, 1.0 - lower)


def test_the_http_apis_take_speculative_as_an_extra_field(http_daemon: Any) -> None:
    import httpx
    import openai

    sdk = openai.OpenAI(base_url=f"{http_daemon.base_url}/v1", api_key="x", max_retries=0)
    prompt = PROMPTS[7]
    plain = sdk.completions.create(model="tiny", prompt=prompt, max_tokens=16)
    fast = sdk.completions.create(
        model="tiny", prompt=prompt, max_tokens=16, extra_body={"speculative": LOOKUP}
    )
    assert fast.choices[0].text == plain.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="tiny", prompt="x", extra_body={"speculative": "maybe"})
    assert info.value.body["param"] == "speculative"  # type: ignore[index]
    url, body = f"{http_daemon.base_url}/api/generate", {"model": "tiny", "prompt": prompt}
    options: dict[str, Any] = {"num_predict": 16}
    replies = [
        httpx.post(url, json={**body, "stream": False, "options": o}, timeout=60).json()
        for o in (options, {**options, "speculative": LOOKUP})
    ]
    assert replies[0]["response"] == replies[1]["response"]
