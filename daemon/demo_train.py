"""Training the shipped demo model: a small llama taught Python on this Python's stdlib.

``python -m mlxd.daemon.demo_train --out DIR`` writes an mlx-lm model directory (tied
embeddings, bfloat16 weights, the demo tokenizer) plus ``training.json``: the settings, the
loss curve and the held-out loss. What ships in ``daemon/demo_weights/`` is that directory,
made with the default ``SETTINGS``; ``ensure_demo_model`` installs it as the demo model.

The data: the top-level ``*.py`` files of the standard library, less ``HELD_OUT`` (named
files, after the tokenizer's own corpus in sorted order, so neither the tokenizer nor the
model saw them; the held-out loss is measured on them). A fraction ``fim_rate`` of the
samples are fill-in-the-middle examples in PSM order with the daemon's FIM tokens and no
BOS, as daemon/rendering.py frames a request with a ``suffix``:
``<|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle </s>``; the rest are
windows of the files joined by ``</s>``.

Determinism: the corpus and tokenizer are fixed by the Python version (its stdlib); the
initial weights come from ``numpy.random.default_rng(seed)`` and the data order from a
second stream of it, so the samples are the same everywhere for a Python version. The
floats of training depend on MLX's kernels and the BLAS (threads, summation order): run
twice for 100 steps on one machine with one MLX and BLAS they came out byte-identical
(see README); another BLAS or MLX may round differently and drift apart over the steps.

Threading: a command-line job of its own; it runs MLX on the calling thread and shares
nothing with a daemon.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from tokenizers import Tokenizer

from .demo_model import SPECIAL_TOKENS, write_tokenizer

# Held out from training (and, sorted after "io.py", from the tokenizer's corpus too);
# present in every Python from 3.10 on.
HELD_OUT = [
    "numbers.py",
    "pprint.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "string.py",
    "textwrap.py",
    "tokenize.py",
]

MODEL_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
SETTINGS: dict[str, Any] = {
    "seed": 0,
    "steps": 1700,
    "batch": 4,
    "seq_len": 256,
    "lr": 3e-3,
    "warmup": 50,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "fim_rate": 0.5,
}


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): the stdlib's top-level sources, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    return [p for p in files if p.name not in HELD_OUT], [p for p in files if p.name in HELD_OUT]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _ids(tokenizer: Tokenizer, names: list[str]) -> list[int]:
    return [tokenizer.token_to_id(n) for n in names]


def _stream(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """The files' tokens, each followed by EOS, in one array."""
    (eos,) = _ids(tokenizer, ["</s>"])
    out: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        out += enc.ids
        out.append(eos)
    return np.array(out, np.int32)


def _fim_sample(
    tokenizer: Tokenizer, text: str, rng: np.random.Generator, width: int, chars: int
) -> tuple[list[int], int]:
    """One PSM example from a random window of ``text``: (tokens, where the middle starts)."""
    pre, suf, mid, eos = _ids(tokenizer, [*SPECIAL_TOKENS[6:9], "</s>"])
    start = int(rng.integers(0, max(1, len(text) - chars)))
    window = text[start : start + chars]
    # The middle: most often whole lines (what an editor asks for), else any character span.
    a, b = sorted(int(x) for x in rng.integers(0, len(window) + 1, size=2))
    if rng.random() < 0.5:
        a = window.rfind("\n", 0, a) + 1
        end = window.find("\n", b)
        b = len(window) if end < 0 else end + 1
    head, middle, tail = (tokenizer.encode(s).ids for s in (window[:a], window[a:b], window[b:]))
    tokens = [pre, *head, suf, *tail, mid]
    return [*tokens, *middle, eos][: width + 1], len(tokens)


def make_batches(tokenizer: Tokenizer, texts: list[str], s: dict[str, Any]) -> np.ndarray:
    """Every step's inputs, fixed by the seed: int32 [steps, batch, seq_len + 1], -1 padding."""
    rng = np.random.default_rng([s["seed"], 1])
    stream = _stream(tokenizer, texts)
    width = s["seq_len"]
    # A FIM window's characters: about ``width`` tokens at the corpus's chars per token.
    chars = int(0.8 * width * sum(map(len, texts)) / len(stream))
    weights = np.array([len(t) for t in texts], np.float64)
    weights /= weights.sum()  # a FIM example's file: in proportion to its size
    out = np.full((s["steps"], s["batch"], width + 1), -1, np.int32)
    for step in range(s["steps"]):
        for row in range(s["batch"]):
            if rng.random() < s["fim_rate"]:
                text = texts[int(rng.choice(len(texts), p=weights))]
                tokens, _ = _fim_sample(tokenizer, text, rng, width, chars)
                out[step, row, : len(tokens)] = tokens
            else:
                at = int(rng.integers(0, len(stream) - width - 1))
                out[step, row] = stream[at : at + width + 1]
    return out


def init_weights(config: dict[str, Any], seed: int) -> dict[str, mx.array]:
    """MLX's own init scales, drawn from numpy (the same everywhere): embeddings and linears
    N(0, 1/fan_in), the residual outputs scaled by 1/sqrt(2 * layers), norms at one. (GPT-2's
    N(0, 0.02) is too small this narrow: the model sat at the unigram loss for hundreds of
    steps.)"""
    model = llama.Model(llama.ModelArgs.from_dict(config))
    rng = np.random.default_rng([seed, 0])
    out = {}
    scale = 1 / math.sqrt(2 * config["num_hidden_layers"])
    for name, param in sorted(tree_flatten(model.parameters())):
        if name.endswith("norm.weight"):
            w = np.ones(param.shape, np.float32)
        else:
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            sd = (scale if residual else 1.0) / math.sqrt(param.shape[-1])
            w = rng.standard_normal(param.shape, dtype=np.float32) * np.float32(sd)
        out[name] = mx.array(w)
    return out


def _loss(model: nn.Module, batch: mx.array) -> tuple[mx.array, mx.array]:
    inputs, targets = batch[:, :-1], batch[:, 1:]
    mask = targets >= 0
    logits = model(mx.maximum(inputs, 0)).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, mx.maximum(targets, 0)) * mask
    n = mask.sum()
    return ce.sum() / n, n


def heldout_loss(model: nn.Module, tokenizer: Tokenizer, files: list[Path], width: int) -> float:
    """Mean next-token loss (nats) over the held-out files, in non-overlapping windows."""
    stream = _stream(tokenizer, [_read(p) for p in files])
    total, count = 0.0, 0
    for at in range(0, len(stream) - 1, width):
        chunk = mx.array(stream[None, at : at + width + 1])
        loss, n = _loss(model, chunk)
        total += loss.item() * n.item()
        count += n.item()
    return total / count


def train(out: Path, settings: dict[str, Any] | None = None, log: Any = print) -> dict[str, Any]:
    """Train and write the model directory ``out``; returns what ``training.json`` holds."""
    s = {**SETTINGS, **(settings or {})}
    out.mkdir(parents=True, exist_ok=True)
    config = {**MODEL_CONFIG}
    tokenizer = write_tokenizer(out, config)
    train_files, held_out = stdlib_files()
    texts = [_read(p) for p in train_files]
    t0 = time.perf_counter()
    batches = make_batches(tokenizer, texts, s)
    log(f"data: {len(texts)} files, {batches.shape} tokens in {time.perf_counter() - t0:.1f} s")

    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.update(tree_unflatten(list(init_weights(config, s["seed"]).items())))
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    warmup = optim.linear_schedule(s["lr"] / s["warmup"], s["lr"], s["warmup"])
    decay = optim.cosine_decay(s["lr"], s["steps"] - s["warmup"], s["lr"] * s["min_lr_ratio"])
    schedule = optim.join_schedules([warmup, decay], [s["warmup"]])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=s["weight_decay"])
    step_fn = nn.value_and_grad(model, _loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch: mx.array) -> mx.array:
        (loss, _), grads = step_fn(model, batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    log(f"model: {params} parameters; {s['steps']} steps of {s['batch']}x{s['seq_len']}")
    curve: list[list[float]] = []
    t0 = time.perf_counter()
    for i in range(s["steps"]):
        loss = step(mx.array(batches[i]))
        mx.eval(state)
        if i % 50 == 0 or i == s["steps"] - 1:
            elapsed = time.perf_counter() - t0
            curve.append([i, round(loss.item(), 4)])
            tps = (i + 1) * s["batch"] * s["seq_len"] / elapsed
            log(f"step {i}: loss {loss.item():.3f}, {elapsed:.0f} s, {tps:.0f} tokens/s")
    seconds = time.perf_counter() - t0

    weights = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
    model.update(tree_unflatten(list(weights.items())))  # held-out loss of what ships
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    held = heldout_loss(model, tokenizer, held_out, s["seq_len"])
    report = {
        "settings": s,
        "model": config,
        "parameters": params,
        "held_out_files": HELD_OUT,
        "held_out_loss": round(held, 4),
        "uniform_loss": round(math.log(config["vocab_size"]), 4),
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(s["steps"] * s["batch"] * s["seq_len"] / seconds),
        "loss_curve": curve,
        "mlx": mx.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"held-out loss {held:.3f} (uniform {math.log(config['vocab_size']):.3f})")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the model directory to write")
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    args = parser.parse_args(argv)
    if args.steps <= SETTINGS["warmup"]:
        parser.error(f"--steps must be more than the {SETTINGS['warmup']} warm-up steps")
    train(args.out, {"steps": args.steps})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
