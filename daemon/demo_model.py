"""The demo models: the shipped trained one, and small random-weight llamas built locally.

mlxd must be usable (and testable) with no download. The demo model a fresh install serves
("demo" in the configuration) is the trained one in ``daemon/demo_weights/`` (made by
daemon/demo_train.py; it writes Python-like text and fills FIM gaps), which
``ensure_demo_model`` copies into the demo directory. The random-weight sizes in ``SIZES``
are written from nothing: a byte-level BPE tokenizer trained on this Python's own standard
library sources, and llama weights drawn from ``numpy.random.default_rng(seed)``. Their
text is gibberish, but varied, and the shapes, tokenizer, chat template and streaming paths
are those of a real model; "tiny" is for tests and must build and run fast on a small CPU.

The weights are the same on every machine; the tokenizer depends on the stdlib sources, so
it is the same for a given Python version. A directory is complete when its fingerprint
(``mlxd_demo.json``, written last) matches the requested build and the files it hashes;
builds go to a temporary sibling and are renamed into place, so concurrent builders and
interrupted builds never leave a half-written model where a reader would load it.

Threading: pure file and CPU work, callable from any thread. The only MLX work (a dtype
cast and the save) runs on the CPU stream of the calling thread, and no array made here
outlives the call: nothing is shared with the worker thread, which loads the files itself.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import default_demo_model_dir

BUILDER_VERSION = 1
FINGERPRINT_FILE = "mlxd_demo.json"

_COMMON: dict[str, Any] = {
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
DEMO_CONFIG: dict[str, Any] = {
    **_COMMON,
    "num_hidden_layers": 4,
    "hidden_size": 256,
    "intermediate_size": 512,
    "vocab_size": 4096,
}
TINY_CONFIG: dict[str, Any] = {
    **_COMMON,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "vocab_size": 1024,
}
# For bench/prompt_cache.py: cold prefill of a ~1500-token prompt must dominate time to
# first token yet take only 1-3 s on a small CPU, so the benchmark finishes in minutes. On
# MLX's CPU backend attention, not the linears, is what costs at that length (its softmax
# over the prompt squared: ~0.3 s per head per layer at 1500 tokens, measured on 2 x86
# cores), so this is shallow, with a wider MLP than "demo"; same tokenizer (vocab).
BENCH_CONFIG: dict[str, Any] = {
    **_COMMON,
    "num_hidden_layers": 2,
    "hidden_size": 256,
    "intermediate_size": 704,
    "vocab_size": 4096,
}
# For bench/concurrency.py: the 4-layer, 128-wide llama that issue 4's reference figures
# for mlx_lm.server were measured on.
SMALL_CONFIG: dict[str, Any] = {
    **_COMMON,
    "num_hidden_layers": 4,
    "hidden_size": 128,
    "intermediate_size": 256,
    "vocab_size": 4096,
}
SIZES: dict[str, dict[str, Any]] = {
    "demo": DEMO_CONFIG,
    "small": SMALL_CONFIG,
    "tiny": TINY_CONFIG,
    "bench": BENCH_CONFIG,
}

SPECIAL_TOKENS = [
    "<s>",
    "</s>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<pad>",
]
EOS_TOKENS = ["</s>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Variants whose tokenizer and chat template carry mlx-lm's tool-call and thinking markers,
# so that tests run mlx-lm's own detection and parsers (tokenizer_utils._infer_thinking,
# _infer_tool_parser), not a stand-in. Each adds its markers as special tokens (one id
# each) after SPECIAL_TOKENS, and a template naming them the way the real families do.
# "qwen3": thinking (<think>...</think>, opened by the generation prompt unless
# enable_thinking is false, as Qwen3's thinking templates do; reasoning_effort goes into a
# system line) and Qwen3-Coder's XML tool calls (parser qwen3_coder). "hermes": JSON tool
# calls in <tool_call> (parser json_tools), no thinking.
_TOOLS_HEADER = (
    "{% if tools %}{{ '<|system|>\n# Tools\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}{{ '<|end|>\n' }}{% endif %}"
)
_QWEN3_CALL = (
    "{% for tool_call in message.tool_calls or [] %}"
    "{{ '<tool_call>\n<function=' + tool_call.function.name + '>\n' }}"
    "{% for k, v in tool_call.function.arguments.items() %}"
    "{{ '<parameter=' + k + '>\n' + (v | string) + '\n</parameter>\n' }}{% endfor %}"
    "{{ '</function>\n</tool_call>' }}{% endfor %}"
)
_HERMES_CALL = (
    "{% for tool_call in message.tool_calls or [] %}"
    "{{ '<tool_call>\n' }}{{ {'name': tool_call.name or tool_call.function.name, "
    "'arguments': tool_call.function.arguments} | tojson }}{{ '\n</tool_call>' }}{% endfor %}"
)


def _marker_template(call: str, thinking: bool) -> str:
    effort = (
        "{% if reasoning_effort is defined and reasoning_effort %}"
        "{{ '<|system|>\nReasoning: ' + reasoning_effort + '<|end|>\n' }}{% endif %}"
    )
    opening = "{{ '<|assistant|>\n' }}"
    if thinking:
        opening += (
            "{% if enable_thinking is defined and not enable_thinking %}"
            "{{ '<think>\n\n</think>\n\n' }}{% else %}{{ '<think>\n' }}{% endif %}"
        )
    return (
        (effort if thinking else "") + _TOOLS_HEADER + "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + (message['content'] or '') }}"
        + call
        + "{{ '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}" + opening + "{% endif %}"
    )


MARKERS: dict[str, tuple[list[str], str]] = {
    "qwen3": (
        ["<think>", "</think>", "<tool_call>", "</tool_call>"],
        _marker_template(_QWEN3_CALL, thinking=True),
    ),
    "hermes": (["<tool_call>", "</tool_call>"], _marker_template(_HERMES_CALL, thinking=False)),
}

# Enough text for a few-thousand-token BPE while training stays around a second.
_CORPUS_CHARS = 2_000_000
# Init, tuned by experiment. With the usual std 0.02 everywhere the residual stream is
# little more than the last token's embedding, so every chat prompt (all ending in
# "<|assistant|>\n") got the same reply. Unit-std embeddings and linears at
# gain/sqrt(fan_in) let attention mix the context in; the lm_head gain gives logits of std
# ~4, so sampling at temperature 1 is not uniform noise.
_EMBED_STD = 1.0
_LINEAR_GAIN = 1.6
_HEAD_GAIN = 4.0
# Special tokens (EOS included) and unprintable bytes get shrunken lm_head rows: greedy
# replies then run to max_tokens and print cleanly, though sampling may still pick them.
_QUIET_SCALE = 0.5


TRAINED_DIR = Path(__file__).with_name("demo_weights")
"""The shipped trained demo model (daemon/demo_train.py made it): what users get as "demo"."""


def ensure_demo_model(out_dir: str | Path | None = None) -> Path:
    """The demo model directory: the shipped trained model, installed there first if it is
    missing or stale."""
    return install_trained_model(out_dir if out_dir is not None else default_demo_model_dir())


def install_trained_model(out_dir: str | Path) -> Path:
    """Copy the shipped trained model to ``out_dir`` (unless it is already there)."""
    names = sorted(p.name for p in TRAINED_DIR.iterdir() if p.is_file())
    shipped = {name: _sha256(TRAINED_DIR / name) for name in names}
    # The copy is stale (and replaced) once the shipped files change, e.g. by an upgrade.
    want = {"builder": BUILDER_VERSION, "size": "trained", "shipped": shipped}

    def fill(tmp: Path) -> None:
        for name in names:
            shutil.copyfile(TRAINED_DIR / name, tmp / name)

    return _build(Path(out_dir), want, fill)


def build_demo_model(
    out_dir: str | Path,
    *,
    size: Literal["demo", "small", "tiny", "bench"] = "demo",
    seed: int = 0,
    markers: str | None = None,
) -> Path:
    """Write a random-weight model to ``out_dir`` (unless it is already there) and return
    the path. ``markers``: one of ``MARKERS`` (a tokenizer and template with tool-call and
    thinking markers), or None for the plain chat template."""
    if size not in SIZES:
        raise ValueError(f"unknown demo model size {size!r}; expected one of {sorted(SIZES)}")
    if markers is not None and markers not in MARKERS:
        raise ValueError(
            f"unknown demo model markers {markers!r}; expected one of {sorted(MARKERS)}"
        )
    want: dict[str, Any] = {"builder": BUILDER_VERSION, "size": size, "seed": seed}
    if markers is not None:  # absent for the plain builds, so theirs stay valid
        want["markers"] = markers
    return _build(Path(out_dir), want, lambda tmp: _write_model(tmp, SIZES[size], seed, markers))


def _build(out_dir: Path, want: dict[str, Any], fill: Callable[[Path], None]) -> Path:
    out = out_dir.expanduser().absolute()
    if _is_complete(out, want):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        fill(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        # Provenance only: a random build's tokenizer corpus is this Python's stdlib.
        python = ".".join(map(str, sys.version_info[:3]))
        _write_json(tmp / FINGERPRINT_FILE, {**want, "python": python, "files": files})
        _install(tmp, out, want)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _install(tmp: Path, out: Path, want: dict[str, Any]) -> None:
    for _ in range(5):
        try:
            os.replace(tmp, out)  # atomic; replaces only a missing or empty directory
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if _is_complete(out, want):
            return  # another builder won the race with the same build
        if not (out / FINGERPRINT_FILE).is_file():
            raise FileExistsError(f"{out} is not empty and not a demo model; not replacing it")
        # A stale demo build: move it aside, then retry. If another builder moved it
        # first, the rename fails and the next attempt sees that builder's result.
        stale = out.with_name(f".{out.name}.stale-{uuid.uuid4().hex}")
        try:
            os.replace(out, stale)
        except FileNotFoundError:
            continue
        shutil.rmtree(stale, ignore_errors=True)
    raise RuntimeError(f"could not install the demo model at {out}")


def _is_complete(out: Path, want: dict[str, Any]) -> bool:
    try:
        found = json.loads((out / FINGERPRINT_FILE).read_text())
        return {k: found.get(k) for k in want} == want and all(
            _sha256(out / name) == digest for name, digest in found["files"].items()
        )
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_model(out: Path, config: dict[str, Any], seed: int, markers: str | None) -> None:
    tokenizer = write_tokenizer(out, config, markers)
    specials = len(SPECIAL_TOKENS) + (len(MARKERS[markers][0]) if markers is not None else 0)
    weights = _weights(config, seed, _quiet_ids(tokenizer, specials))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})


def write_tokenizer(out: Path, config: dict[str, Any], markers: str | None = None) -> Tokenizer:
    """Train the tokenizer and write it, its settings and ``config.json`` (all but the
    weights) to ``out``; daemon/demo_train.py's trained model uses it too."""
    extra, template = MARKERS[markers] if markers is not None else ([], CHAT_TEMPLATE)
    specials = SPECIAL_TOKENS + extra
    tokenizer = _train_tokenizer(config["vocab_size"], specials)
    tokenizer.save(str(out / "tokenizer.json"))
    eos_ids = [tokenizer.token_to_id(t) for t in EOS_TOKENS]
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            # Cleanup would rewrite " ," as "," and break the encode/decode round trip.
            "clean_up_tokenization_spaces": False,
            "model_max_length": config["max_position_embeddings"],
            "chat_template": template,
        },
    )
    _write_json(
        out / "config.json",
        {
            **config,
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": tokenizer.token_to_id("<s>"),
            "eos_token_id": eos_ids,
            "pad_token_id": tokenizer.token_to_id("<pad>"),
            "torch_dtype": "bfloat16",
        },
    )
    return tokenizer


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _train_tokenizer(vocab_size: int, specials: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # No prefix space, so decode(encode(s)) == s; the ByteLevel decoder is what makes
    # mlx-lm pick its BPEStreamingDetokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # All 256 bytes, so any text encodes, not only what the corpus contains.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def _corpus() -> list[str]:
    """Text every machine has: this Python's stdlib sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > _CORPUS_CHARS:
            break
        texts.append(text)
        total += len(text)
    return texts


def _weights(config: dict[str, Any], seed: int, quiet_ids: list[int]) -> dict[str, mx.array]:
    # The model is built only for its parameter names and shapes; its own (lazy, never
    # evaluated) initialisation is replaced by numpy draws, which are the same everywhere.
    model = llama.Model(llama.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = {}
    for name, param in sorted(tree_flatten(model.parameters())):
        if name.endswith("norm.weight"):
            w = np.ones(param.shape, np.float32)
        else:
            gain = _HEAD_GAIN if name.startswith("lm_head") else _LINEAR_GAIN
            std = _EMBED_STD if "embed_tokens" in name else gain / param.shape[-1] ** 0.5
            w = rng.standard_normal(param.shape, dtype=np.float32) * np.float32(std)
        if name == "lm_head.weight":
            w[quiet_ids] *= _QUIET_SCALE
        # bfloat16: as portable as float16 and, on the CPU backend, about twice as fast.
        weights[name] = mx.array(w).astype(mx.bfloat16, stream=mx.cpu)
    return weights


def _quiet_ids(tokenizer: Tokenizer, specials: int) -> list[int]:
    """Special tokens, and tokens that decode to control characters or partial UTF-8."""
    quiet = []
    for i in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([i], skip_special_tokens=False)
        if (
            i < specials
            or "\ufffd" in text
            or not text.replace("\n", "").replace("\t", "").isprintable()
        ):
            quiet.append(i)
    return quiet
