"""What a model's files and weights measure, for loading it: bytes on disk, the identity
saved prompt caches are bound to, KV bytes per token, a forward pass's transient bytes, the
vocabulary, and reading lazily loaded weights in groups (for progress).

Threading: worker thread only (these run forward passes and evaluate MLX arrays on the
thread that will run the model).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

LOAD_STEPS = 20
"""About how many groups a model's weights are read in, so progress comes in steps of ~5%."""


def weights_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


WHOLE_FILE_HASH_BYTES = 64 * 1024**2
"""Weight files up to this size are hashed whole; larger ones by their header and samples."""
SAMPLES, SAMPLE_BYTES = 64, 64 * 1024


def identity(path: Path) -> str:
    """What saved prompt-cache entries are bound to: config.json, and each weight file's
    name, size, mtime and contents. Weights swapped in place for others of the same size,
    with the mtime put back, must not find the old KV: the contents are hashed (whole when
    small; else the safetensors header, where every tensor's name, shape and offset is,
    and ``SAMPLES`` blocks spread evenly over the data: 4 MiB read per file, at load)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            if st.st_size <= WHOLE_FILE_HASH_BYTES:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
                continue
            header = fh.read(8)
            digest.update(header)
            digest.update(fh.read(min(int.from_bytes(header, "little"), st.st_size)))
            for i in range(SAMPLES):
                fh.seek((st.st_size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def kv_bytes_per_token(model: Any) -> int:
    """What one more token of context costs in KV state, measured on the model's own cache
    classes (GQA, quantized, sliding window...) after a one-token forward pass: each
    ``[batch, heads, capacity, dim]`` array's bytes over its capacity. Recurrent states
    (not per token) count nothing."""
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    arrays = [a for c in cache for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]
    mx.eval(arrays)
    return sum(math.ceil(a.nbytes / a.shape[2]) for a in arrays if a.ndim == 4 and a.shape[2])


SCRATCH_PROBE_TOKENS = 64


def shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(hidden size, MLP size, attention heads) from a model's config.json."""
    text = config.get("text_config", config)
    hidden = int(text.get("hidden_size", 0))
    intermediate = int(text.get("intermediate_size", 0) or 4 * hidden)
    return hidden, intermediate, int(text.get("num_attention_heads", 0))


def probe_allowance(path: Path) -> int:
    """Room for ``scratch_per_token``'s forward pass, made before loading: a bound from the
    model's shape (each token's activations at 4 bytes a value, its attention scores)."""
    try:
        hidden, intermediate, heads = shape(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0  # the load itself will say what is wrong
    tokens = SCRATCH_PROBE_TOKENS
    return tokens * 4 * (4 * hidden + 4 * intermediate) + heads * tokens * tokens * 8


def scratch_per_token(
    model: Any, config: dict[str, Any], context_length: int | None
) -> tuple[float, float]:
    """MLX's transient bytes in a forward pass, per token processed and per (token,
    context token) pair, beyond the weights and the KV written.

    The first is measured: the peak of a ``SCRATCH_PROBE_TOKENS``-token prefill over its
    start and the KV it wrote, per token (its own attention included). The second, the
    attention scores, is bounded from the shape: 4 bytes per head (scores and their softmax
    at 2 bytes each, or once in float32). Fitting both from small prefills overstates the
    second several times over (measured on MLX's CPU backend: the peak per token rises
    faster at 16-64 tokens than at 256-512); against BatchGenerator's own prefills this
    pair bounds the peak at every size tested (``tests/test_memory.py``). Fused attention
    (Metal) makes the bound loose, never short.

    Resets MLX's peak counter: the caller keeps the peak from before."""
    tokens = SCRATCH_PROBE_TOKENS
    if context_length:
        tokens = max(1, min(tokens, context_length - 1))
    cache = make_prompt_cache(model)
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model(mx.zeros((1, tokens), dtype=mx.int32), cache=cache)
    arrays = [a for c in cache for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]
    mx.eval(arrays)
    peak = max(0, mx.get_peak_memory() - base - sum(a.nbytes for a in arrays))
    heads = getattr(getattr(model, "args", None), "num_attention_heads", None) or shape(config)[2]
    return peak / tokens, 4.0 * heads


def read_weights(model: Any, report: Callable[[int, int], None] | None) -> int:
    """Evaluate a lazily loaded model's parameters, in the model's order, in about
    ``LOAD_STEPS`` groups of similar byte size (one large tensor makes a group alone), calling
    ``report(done, total)`` first with 0 and then after each group. Returns the total: the
    bytes of the weights in memory. Reading by group costs nothing measurable over one
    ``mx.eval`` of everything: a load is bound by reading the files."""
    params = [v for _, v in tree_flatten(model.parameters()) if isinstance(v, mx.array)]
    total = sum(v.nbytes for v in params)
    if report is not None:
        report(0, total)
    target = max(1, math.ceil(total / LOAD_STEPS))
    group: list[mx.array] = []
    size = done = 0
    for i, v in enumerate(params):
        group.append(v)
        size += v.nbytes
        if size >= target or i == len(params) - 1:
            mx.eval(group)
            done += size
            group, size = [], 0
            if report is not None:
                report(done, total)
    return total


def vocab_size(model: Any, tokenizer: TokenizerWrapper) -> int:
    """Token ids the model can take: its embedding rows, else the tokenizer's size."""
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    return int(size) if size else len(tokenizer._tokenizer)
