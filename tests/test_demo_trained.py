"""The shipped trained demo model: mlx-lm loads it, a real daemon serves it as the default
"demo" model with mlx-lm's greedy output, and it is not noise: it has learned Python from
the standard library (held-out loss far below a uniform or a random-weight model's) and
fills a FIM gap using the text after it."""

from __future__ import annotations

import functools
import json
import math
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from conftest import Daemon, short_tmpdir, start_daemon
from helpers import fim_tokens, reference
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load

from mlxd.daemon.demo_model import FINGERPRINT_FILE, TRAINED_DIR, build_demo_model
from mlxd.daemon.demo_train import HELD_OUT, MODEL_CONFIG

UNIFORM = math.log(4096)  # nats per token of a model that knows nothing: ln(vocab) = 8.32
LIMIT = 0.7  # of UNIFORM: the held-out loss the trained model must stay under
# Enough held-out text for a stable mean, few enough tokens for a fast test.
HELD_OUT_TOKENS = 6000


@pytest.fixture(scope="module")
def demo_daemon() -> Iterator[tuple[Daemon, Path]]:
    """A daemon with no model named: it serves the default demo model from its cache dir."""
    cache = short_tmpdir()
    d = start_daemon(short_tmpdir() / "mlxd.sock", env={"XDG_CACHE_HOME": str(cache)})
    yield d, cache / "mlxd" / "demo-model"
    code = d.stop()
    shutil.rmtree(d.socket.parent, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    assert code == 0, d.log()


@functools.cache
def _float32(model_dir: str) -> Any:
    """The model's weights upcast to float32 for scoring: the same numbers, and on this
    CPU many times faster (MLX's bfloat16 matmul does not go through the BLAS)."""
    model, _ = load(model_dir)
    model.update(tree_map(lambda a: a.astype(mx.float32), model.parameters()))
    return model


def _loss(model_dir: Path, ids: list[int]) -> float:
    """Mean next-token cross-entropy (nats) of ``ids``, in windows of 256 tokens."""
    model = _float32(str(model_dir))
    total, count = 0.0, 0
    for at in range(0, len(ids) - 1, 256):
        chunk = ids[at : at + 257]
        logits = model(mx.array([chunk[:-1]]))[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logprobs, mx.array(chunk[1:])[:, None], axis=-1)
        total -= picked.sum().item()
        count += len(chunk) - 1
    return total / count


def _held_out_ids(model_dir: Path) -> list[int]:
    _, tokenizer = load(str(model_dir))
    root = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in HELD_OUT:
        ids += tokenizer.encode((root / name).read_text(encoding="utf-8"))
    return ids[:HELD_OUT_TOKENS]


def test_the_shipped_model_loads_with_mlx_lm_and_is_small() -> None:
    model, tokenizer = load(str(TRAINED_DIR))
    assert len(model.layers) == MODEL_CONFIG["num_hidden_layers"]
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert 1_000_000 < params < 10_000_000  # "a few million parameters"
    assert (TRAINED_DIR / "model.safetensors").stat().st_size <= 10 * 2**20
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert tokenizer.convert_tokens_to_ids("<|fim_middle|>") is not None
    training = json.loads((TRAINED_DIR / "training.json").read_text())
    assert training["parameters"] == params and training["held_out_files"] == HELD_OUT
    assert training["held_out_loss"] < LIMIT * UNIFORM


def _context_free(ids: list[int]) -> float:
    """The loss of the best model that ignores context, on ``ids``: the entropy of their own
    token frequencies (a lower bound for any unigram model)."""
    counts: dict[int, int] = {}
    for i in ids[1:]:
        counts[i] = counts.get(i, 0) + 1
    n = len(ids) - 1
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_held_out_loss_is_far_below_a_uniform_and_a_random_model(tmp_path: Path) -> None:
    # Standard-library files the model (and its tokenizer) never trained on. A uniform
    # model's loss is ln(4096) = 8.32 nats per token; the random-weight "demo" size (same
    # tokenizer recipe) does worse than uniform. The trained model must be well under
    # uniform (below LIMIT of it), far below the random model, and below the best
    # context-free guess on these very tokens: it has learned to use the text before.
    ids = _held_out_ids(TRAINED_DIR)
    trained = _loss(TRAINED_DIR, ids)
    random_dir = build_demo_model(tmp_path / "random", size="demo")
    random = _loss(random_dir, _held_out_ids(random_dir)[:1500])  # 15.8: far off, soon seen
    assert trained < LIMIT * UNIFORM, trained
    assert trained < random - 3, (trained, random)
    assert trained < _context_free(ids), (trained, _context_free(ids))


def test_the_default_demo_model_is_the_trained_one_with_mlx_lms_greedy_output(
    demo_daemon: tuple[Daemon, Path],
) -> None:
    daemon, installed = demo_daemon
    prompt = "def fibonacci(n):"
    with daemon.client() as client:
        done = client.generate(prompt, max_tokens=64)
    text, ids = reference(installed, prompt, 64)
    assert done.tokens == ids and done.text == text
    fingerprint = json.loads((installed / FINGERPRINT_FILE).read_text())
    assert fingerprint["size"] == "trained"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (installed / name).read_bytes() == (TRAINED_DIR / name).read_bytes()


def _looks_like_python(text: str) -> bool:
    """Indented lines, by multiples of four spaces, of printable ASCII: the shape of the
    stdlib's code (a random model's text has none of it)."""
    lines = [line for line in text.split("\n")[1:] if line.strip()]
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    return (
        len(lines) >= 2
        and all(i % 4 == 0 for i in indents)
        and any(i >= 4 for i in indents)
        and text.isascii()
    )


def test_the_dev_demo_command_writes_python_like_text(
    demo_daemon: tuple[Daemon, Path], tmp_path: Path
) -> None:
    # `./dev demo`'s own command on the trained model; the random "demo" size's greedy text
    # (mlx-lm's, in this process) fails the same check.
    daemon, _ = demo_daemon
    out = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "generate", "--socket", str(daemon.socket),
         "--max-tokens", "64", "def fibonacci(n):"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert _looks_like_python(out.stdout), out.stdout
    random_dir = build_demo_model(tmp_path / "random", size="demo")
    random_text, _ = reference(random_dir, "def fibonacci(n):", 64)
    assert not _looks_like_python(random_text), random_text


PREFIX = "def greet(name):\n    "
SUFFIX = "\n    return message\n"


def _logprob(model_dir: Path, context: list[int], target: list[int]) -> float:
    model = _float32(str(model_dir))
    logits = model(mx.array([context + target[:-1]]))[0, len(context) - 1 :].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logprobs, mx.array(target)[:, None], axis=-1).sum().item()


def test_fim_uses_the_text_after_the_gap(demo_daemon: tuple[Daemon, Path]) -> None:
    daemon, installed = demo_daemon
    _, tokenizer = load(str(installed))
    (eos,) = tokenizer.convert_tokens_to_ids(["</s>"])
    # One-line gaps in a held-out file, 12 lines either side: the true line (and the EOS
    # that ends a FIM answer, an extra token to pay for) must cost fewer nats per token
    # framed as FIM than after the prefix alone. (Measured: 5.43 against 5.72; the model is
    # tiny and the gain modest, but it is there only if the model reads the suffix.)
    lines = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().split("\n")
    fim = plain = 0.0
    count = 0
    for i in range(60, 420, 9):
        if not lines[i].strip():
            continue
        prefix, suffix = "\n".join(lines[i - 12 : i]) + "\n", "\n".join(lines[i + 1 : i + 12])
        middle = tokenizer.encode(lines[i] + "\n")
        fim -= _logprob(installed, fim_tokens(installed, prefix, suffix), [*middle, eos])
        plain -= _logprob(installed, tokenizer.encode(prefix), middle)
        count += len(middle)
    assert fim / count < plain / count - 0.1, (fim / count, plain / count)
    # Through the daemon (native suffix): mlx-lm's greedy infill for the same framing.
    with daemon.client() as client:
        done = client.generate(PREFIX, suffix=SUFFIX, max_tokens=32)
    text, ids = reference(installed, fim_tokens(installed, PREFIX, SUFFIX), 32)
    assert done.tokens == ids and done.text == text
    assert done.done.fim == "tokens"


def test_the_demo_model_command_installs_the_trained_model_by_default(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "demo-model", "--out", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "m" / FINGERPRINT_FILE).read_text())["size"] == "trained"
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (
        TRAINED_DIR / "model.safetensors"
    ).read_bytes()
