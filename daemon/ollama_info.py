"""What Ollama's model endpoints (``/api/tags``, ``/api/ps``, ``/api/show``) say about a
model, read from its directory: size on disk, a digest, the modification time, the
architecture and parameter count (from ``config.json`` and the safetensors headers), the
chat template, whether it has fill-in-the-middle tokens, and whether mlx-lm finds
tool-call and thinking markers in it (its own inference, run on the template and the
vocabulary read from disk rather than on a loaded tokenizer).

Threading: plain file reads, no MLX. ``describe`` may block on the disk, so the event
loop runs it with ``asyncio.to_thread``; its cache is guarded by a lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .rendering import FIM_TOKENS


@dataclass(frozen=True)
class ModelFacts:
    size: int
    """Bytes of the model's files on disk."""
    digest: str
    modified_at: str
    family: str
    parameter_count: int
    quantization: str
    context_length: int | None
    template: str
    fim: bool
    tools: bool = False
    """mlx-lm knows the chat template's tool-call format (``has_tool_calling``)."""
    thinking: bool = False
    """mlx-lm finds thinking markers in the vocabulary (``has_thinking``)."""
    model_info: dict[str, Any] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "safetensors",
            "family": self.family,
            "families": [self.family],
            "parameter_size": human_count(self.parameter_count),
            "quantization_level": self.quantization,
        }


def rfc3339(t: float) -> str:
    """Unix time ``t`` as Ollama writes times: RFC 3339, UTC."""
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def human_count(n: int) -> str:
    """Ollama's parameter sizes: ``7.6B``, ``494.03M``, ``12.5K``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


_lock = threading.Lock()
_cache: dict[tuple[str, tuple[tuple[str, int, int], ...]], ModelFacts] = {}


def describe(path: str) -> ModelFacts:
    """The facts of the model at ``path`` (a directory), cached until one of its files
    changes."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    stamp = tuple(
        (str(p.relative_to(root)), s.st_size, s.st_mtime_ns) for p in files for s in [p.stat()]
    )
    key = (path, stamp)
    with _lock:
        if key in _cache:
            return _cache[key]
    facts = _read(root, files, stamp)
    with _lock:
        _cache[key] = facts
    return facts


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _parameters(files: list[Path], bits: int | None) -> int:
    """Parameters by the safetensors headers: quantized weights (``uint32`` words packing
    32/bits values each) unpacked, their scales and biases not counted."""
    total = 0
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            continue
        for name, t in header.items():
            if name == "__metadata__" or name.endswith((".scales", ".biases")):
                continue
            count = 1
            for d in t.get("shape", []):
                count *= d
            if bits and t.get("dtype") == "U32":
                count *= 32 // bits
            total += count
    return total


class _Vocabulary:
    """What mlx-lm's marker inference reads of a tokenizer: the chat template and the
    vocabulary (token ids are not needed to know whether markers exist)."""

    def __init__(self, template: str, tokenizer_json: str) -> None:
        self.chat_template = template
        self._vocab: dict[str, int] = {}
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            data = json.loads(tokenizer_json)
            vocab = data.get("model", {}).get("vocab") or {}
            pieces = vocab if isinstance(vocab, dict) else [v[0] for v in vocab]  # unigram
            self._vocab = {str(p): 0 for p in pieces}
            self._vocab.update((t["content"], 0) for t in data.get("added_tokens", []))

    def get_vocab(self) -> dict[str, int]:
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return []


def _markers(template: str, tokenizer_json: str, parser: Any) -> tuple[bool, bool]:
    """Whether mlx-lm will find a tool-call format and thinking markers, by the inference
    its ``load`` runs (``tool_parser_type`` in tokenizer_config.json first, as there)."""
    from mlx_lm import tokenizer_utils  # heavy (transformers): only when a model is shown

    shim = _Vocabulary(template, tokenizer_json)
    try:
        tools = bool(parser) or tokenizer_utils._infer_tool_parser(shim) is not None
        thinking = tokenizer_utils._infer_thinking(shim)[0] is not None
    except AttributeError:  # a mlx-lm without these: claim neither
        return False, False
    return tools, thinking


def _read(root: Path, files: list[Path], stamp: tuple[tuple[str, int, int], ...]) -> ModelFacts:
    config = _json(root / "config.json")
    tokenizer_config = _json(root / "tokenizer_config.json")
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    dtype = str(config.get("torch_dtype") or "float16")
    quantization = f"Q{bits}" if bits else {"bfloat16": "BF16", "float32": "F32"}.get(dtype, "F16")
    family = str(config.get("model_type") or "unknown")
    context = config.get("max_position_embeddings")
    params = _parameters(files, bits if isinstance(bits, int) else None)
    template = tokenizer_config.get("chat_template") or ""
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    vocab = ""
    with contextlib.suppress(OSError):
        vocab = (root / "tokenizer.json").read_text()
    fim = any(
        all(f'"{n}"' in vocab or json.dumps(n) in vocab for n in names) for names in FIM_TOKENS
    )
    tools, thinking = _markers(str(template), vocab, tokenizer_config.get("tool_parser_type"))
    info: dict[str, Any] = {"general.architecture": family, "general.parameter_count": params}
    for ours, theirs in (
        ("context_length", "max_position_embeddings"),
        ("embedding_length", "hidden_size"),
        ("feed_forward_length", "intermediate_size"),
        ("block_count", "num_hidden_layers"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
        ("vocab_size", "vocab_size"),
    ):
        if theirs in config:
            info[f"{family}.{ours}"] = config[theirs]
    digest = hashlib.sha256(repr((str(root), stamp)).encode()).hexdigest()
    mtime = max((s[2] for s in stamp), default=0) / 1e9
    return ModelFacts(
        size=sum(s[1] for s in stamp),
        digest=digest,
        modified_at=rfc3339(mtime),
        family=family,
        parameter_count=params,
        quantization=quantization,
        context_length=context if isinstance(context, int) else None,
        template=str(template),
        fim=fim,
        tools=tools,
        thinking=thinking,
        model_info=info,
    )
