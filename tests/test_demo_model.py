"""The demo model builder, against real mlx-lm: deterministic, loadable, varied, idempotent."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import generate, load
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from mlxd.daemon.demo_model import (
    FINGERPRINT_FILE,
    TINY_CONFIG,
    build_demo_model,
    ensure_demo_model,
)

SAMPLES = ["héllo → 世界", 'def f(x):\n\treturn {"a": x} ,  2  ', "  leading spaces"]


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _stamps(path: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in path.iterdir()}


def test_builds_are_byte_identical(tiny_model: Path, tmp_path: Path) -> None:
    again = _files(build_demo_model(tmp_path / "again", size="tiny", seed=0))
    assert again.keys() >= {"tokenizer.json", "config.json", "model.safetensors"}
    assert again == _files(tiny_model)


def test_loads_with_mlx_lm(tiny_model: Path) -> None:
    model, tokenizer = load(str(tiny_model))
    config = json.loads((tiny_model / "config.json").read_text())
    assert len(model.layers) == TINY_CONFIG["num_hidden_layers"]
    assert model.lm_head.weight.shape == (TINY_CONFIG["vocab_size"], TINY_CONFIG["hidden_size"])
    assert model.lm_head.weight.dtype == mx.bfloat16
    end, eos = tokenizer.convert_tokens_to_ids(["<|end|>", "</s>"])
    assert set(config["eos_token_id"]) == {end, eos} == set(tokenizer.eos_token_ids)
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        detok = tokenizer.detokenizer
        detok.reset()
        for i in ids:
            detok.add_token(i)
        detok.finalize()
        # mlx-lm's streaming detokenizer drops one leading space, as for any BPE model.
        assert detok.text == text.removeprefix(" ")


def test_chat_template(tiny_model: Path) -> None:
    _, tokenizer = load(str(tiny_model))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages[1:], add_generation_prompt=True)
    assert all(isinstance(i, int) for i in ids)
    header = tokenizer.encode("<|assistant|>\n")
    assert header[0] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert ids[-len(header) :] == header


def test_greedy_outputs_vary(tiny_model: Path) -> None:
    model, tokenizer = load(str(tiny_model))
    texts = []
    for content in ["hi", "What is MLX?", "def main():"]:
        messages = [{"role": "user", "content": content}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        texts.append(generate(model, tokenizer, prompt, max_tokens=20))
    # Every prompt ends in the same assistant header: the replies must still differ.
    assert len(set(texts)) == 3, texts
    assert all(len(set(t)) > 5 for t in texts), texts


def test_ensure_builds_once_and_replaces_only_stale_demo_builds(
    tiny_model: Path, tmp_path: Path
) -> None:
    # A stale build (a random size) at the demo path is replaced by the shipped trained
    # model...
    path = shutil.copytree(tiny_model, tmp_path / "demo")
    assert ensure_demo_model(path) == path
    assert json.loads((path / FINGERPRINT_FILE).read_text())["size"] == "trained"
    # ...which a second call keeps as it is.
    before = _stamps(path)
    assert ensure_demo_model(path) == path
    assert _stamps(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp dirs left


def test_never_replaces_a_directory_it_did_not_build(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_demo_model(tmp_path / "mine", size="tiny")
    assert _files(tmp_path / "mine") == {"notes.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_concurrent_builders_agree(tiny_model: Path, tmp_path: Path) -> None:
    results: list[Path | BaseException] = []

    def build() -> None:
        try:
            results.append(build_demo_model(tmp_path / "m", size="tiny"))
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "m"] * 2
    assert _files(tmp_path / "m") == _files(tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
