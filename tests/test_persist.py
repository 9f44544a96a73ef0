"""The saved prompt cache through real daemons, on real files: never wrong, never fatal,
never shared (issue 13, items 4-11). Files are tampered with as an attacker or a crash
would leave them; every output is checked against mlx-lm's cold one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, short_tmpdir, start_daemon, wait_ready
from helpers import _load as load
from helpers import reference

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
# Distinct first letters: no two prompts share a prefix, so a skipped file is a clean miss.
PROMPTS = [f"{w} = [" + ", ".join(f"{w}_{i}" for i in range(12)) + "]\n" for w in WORDS]
N = 8
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as another user")


@pytest.fixture
def base() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    subprocess.run(["umount", str(path / "state")], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def folder(base: Path) -> Path:
    return base / "state" / "prompt-cache"


def model_args(model: Path, base: Path) -> tuple[str, ...]:
    return ("--model", f"tiny={model}", "--state-dir", str(base / "state"))


def run(
    base: Path, model: Path, prompts: list[str], sock: str = "mlxd.sock", **kw: Any
) -> tuple[list[Any], Daemon]:
    """One daemon's life: start, generate each prompt, stop (saving); exits 0."""
    d = start_daemon(base / sock, *model_args(model, base), **kw)
    with d.client() as client:
        results = [client.generate(p, max_tokens=N) for p in prompts]
    assert d.stop() == 0, d.log()
    return results, d


def events(d: Daemon, name: str) -> list[dict[str, Any]]:
    lines = (json.loads(x) for x in d.log().splitlines() if x.startswith("{"))
    return [e for e in lines if e.get("event") == name]


def saved(base: Path) -> list[Path]:
    return sorted(p for p in folder(base).glob("*.safetensors") if not p.name.startswith("tmp-"))


def header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and where its tensor data starts."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), 8 + n


def edit_metadata(path: Path, change: Callable[[dict[str, str]], None]) -> None:
    raw = path.read_bytes()
    head, start = header(path)
    change(head["__metadata__"])
    body = json.dumps(head).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[start:])


def by_word(base: Path, model: Path) -> dict[str, Path]:
    """Saved files by the first word of the prompt they hold."""
    _, tokenizer = load(str(model))
    out = {}
    for p in saved(base):
        tokens = json.loads(header(p)[0]["__metadata__"]["0.mlxd_tokens"])
        out[tokenizer.decode(tokens).split(" ")[0]] = p
    return out


def assert_cold(results: list[Any], model: Path, prompts: list[str]) -> None:
    for r, p in zip(results, prompts, strict=True):
        assert r.done.usage.cached_tokens == 0 and r.done.cache.kind == "miss", r.done
        assert r.tokens == reference(model, p, N)[1]


def assert_warm(results: list[Any], model: Path, prompts: list[str]) -> None:
    for r, p in zip(results, prompts, strict=True):
        assert r.done.usage.cached_tokens == r.done.usage.prompt_tokens - 1, r.done
        assert r.tokens == reference(model, p, N)[1]


# ---------------------------------------------------------------------- 4, 5: integrity


def test_overwritten_tensor_data_is_not_used(tiny_model: Path, base: Path) -> None:
    run(base, tiny_model, PROMPTS[:1])
    for p in saved(base):
        raw = bytearray(p.read_bytes())
        start = header(p)[1]
        middle = start + (len(raw) - start) // 2
        raw[middle : middle + 256] = bytes(256)
        p.write_bytes(raw)
    results, d = run(base, tiny_model, PROMPTS[:1])
    assert_cold(results, tiny_model, PROMPTS[:1])
    assert any("integrity" in e["reason"] for e in events(d, "cache_file_skipped")), d.log()


def test_swapped_token_lists_make_both_files_skipped(tiny_model: Path, base: Path) -> None:
    run(base, tiny_model, PROMPTS[:2])
    files = by_word(base, tiny_model)
    a, b = files["alpha"], files["bravo"]
    ta = header(a)[0]["__metadata__"]["0.mlxd_tokens"]
    tb = header(b)[0]["__metadata__"]["0.mlxd_tokens"]
    edit_metadata(a, lambda m: m.update({"0.mlxd_tokens": tb}))
    edit_metadata(b, lambda m: m.update({"0.mlxd_tokens": ta}))
    results, d = run(base, tiny_model, PROMPTS[:2])
    assert_cold(results, tiny_model, PROMPTS[:2])
    assert len(events(d, "cache_file_skipped")) >= 2, d.log()


def test_malformed_files_are_skipped_and_the_daemon_serves(tiny_model: Path, base: Path) -> None:
    prompts = PROMPTS[:5]
    run(base, tiny_model, prompts)
    files = by_word(base, tiny_model)
    edit_metadata(files["alpha"], lambda m: m.update({"0.mlxd_tokens": "5"}))
    edit_metadata(files["bravo"], lambda m: m.update({"0.mlxd_tokens": '["a", "b"]'}))
    edit_metadata(files["charlie"], lambda m: m.pop("0.mlxd_tokens"))
    edit_metadata(files["delta"], lambda m: m.update({"0.mlxd_pin_until": "soon"}))
    files["echo"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    results, d = run(base, tiny_model, prompts)
    assert_cold(results, tiny_model, prompts)
    assert len(events(d, "cache_file_skipped")) >= 5, d.log()


# ---------------------------------------------------------------------- 6, 7: saving


def test_a_kill_mid_save_leaves_the_last_save_loadable(tiny_model: Path, base: Path) -> None:
    first, later = PROMPTS[:4], PROMPTS[4:]
    run(base, tiny_model, first)
    d = start_daemon(base / "mlxd.sock", *model_args(tiny_model, base),
                     env={"MLXD_FAULTS": "save_stall@2"})  # fmt: skip
    try:
        with d.client() as client:
            for p in later:
                client.generate(p, max_tokens=N)
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not events(d, "fault_save_stall"):
            assert time.monotonic() < deadline and d.proc.poll() is None, d.log()
            time.sleep(0.05)
    finally:
        d.stop(signal.SIGKILL)
    results, d = run(base, tiny_model, first)
    assert_warm(results, tiny_model, first)
    # What the killed save left is gone; what is left is what a manifest lists.
    listed = set()
    for m in folder(base).glob("manifest-*.json"):
        listed |= {f["name"] for f in json.loads(m.read_text())["files"]}
    assert {p.name for p in folder(base).iterdir() if not p.name.startswith("manifest-")} == listed


@as_root
def test_a_full_disk_fails_the_save_not_the_shutdown(tiny_model: Path, base: Path) -> None:
    (base / "state").mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(base / "state")],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    d = start_daemon(base / "mlxd.sock", *model_args(tiny_model, base))
    with d.client() as client:
        long = "".join(f"def f_{i}(x):\n    return x * {i}\n" for i in range(60))
        client.generate(long, max_tokens=N)
    # Leave a few KiB: the manifest fits, the entry does not.
    free = os.statvfs(base / "state")
    with open(base / "state" / "filler", "wb") as f:
        f.write(b"x" * (free.f_bavail * free.f_frsize - 8192))
    assert d.stop() == 0, d.log()
    assert events(d, "cache_save_failed"), d.log()
    assert not list(folder(base).glob("*.safetensors")), list(folder(base).iterdir())


def test_an_unreadable_state_folder_leaves_the_daemon_serving(tiny_model: Path, base: Path) -> None:
    """Its state folder lies in a folder the daemon may not enter: 0000 for a user; for
    root, another user's 0700 folder, with the daemon stripped of root's power to pass
    permissions by (``setpriv``: no CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH)."""
    locked = base / "locked"
    locked.mkdir(mode=0o700)
    wrapper: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv, to run root's daemon without CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        wrapper = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
        os.chown(locked, NOBODY, NOBODY)
    else:
        locked.chmod(0)
    log_path = base / "daemon.log"
    config = base / "config.toml"
    config.write_text("")
    cmd = [
        *wrapper, sys.executable, "-m", "mlxd.daemon", "serve",
        "--socket", str(base / "mlxd.sock"), "--log-format", "json",
        "--model", f"tiny={tiny_model}", "--state-dir", str(locked / "state"),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        env = {**os.environ, "MLXD_CONFIG": str(config)}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    d = Daemon(base / "mlxd.sock", proc, log_path)
    try:
        wait_ready(d)
        with d.client() as client:
            r = client.generate(PROMPTS[0], max_tokens=N)
        assert r.tokens == reference(tiny_model, PROMPTS[0], N)[1]
        assert d.stop() == 0, d.log()
        assert events(d, "cache_persist_disabled"), d.log()
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        locked.chmod(0o700)


# ---------------------------------------------------------------------- 8, 9: privacy


@as_root
def test_folders_are_0700_and_files_0600_whatever_the_umask(tiny_model: Path, base: Path) -> None:
    old = os.umask(0o022)  # the daemon inherits it
    try:
        run(base, tiny_model, PROMPTS[:1])
    finally:
        os.umask(old)
    assert stat.S_IMODE((base / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE(folder(base).stat().st_mode) == 0o700
    files = list(folder(base).iterdir())
    assert saved(base) and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files
    ]
    base.chmod(0o755)
    for p in (base / "state", folder(base), *files):
        reader = subprocess.run(
            ["cat", str(p)] if p.is_file() else ["ls", str(p)],
            user=NOBODY, group=NOBODY, capture_output=True, check=False,
        )  # fmt: skip
        assert reader.returncode != 0 and not reader.stdout, p


def test_a_symlinked_cache_folder_is_refused(tiny_model: Path, base: Path) -> None:
    victim = base / "victim-model"
    shutil.copytree(tiny_model, victim)
    (base / "state").mkdir()
    folder(base).symlink_to(victim)
    before = sorted(p.name for p in victim.iterdir())
    _, d = run(base, tiny_model, PROMPTS[:1])
    assert (victim / "model.safetensors").exists()
    assert sorted(p.name for p in victim.iterdir()) == before
    assert events(d, "cache_persist_disabled"), d.log()


@as_root
def test_a_cache_folder_of_another_user_is_refused(tiny_model: Path, base: Path) -> None:
    folder(base).mkdir(parents=True)
    os.chown(folder(base), NOBODY, NOBODY)
    _, d = run(base, tiny_model, PROMPTS[:1])
    assert not list(folder(base).iterdir())
    assert events(d, "cache_persist_disabled"), d.log()


def test_a_state_folder_others_may_write_to_is_refused(tiny_model: Path, base: Path) -> None:
    (base / "state").mkdir()
    (base / "state").chmod(0o777)  # no sticky bit: anyone could swap prompt-cache for a link
    _, d = run(base, tiny_model, PROMPTS[:1])
    assert not saved(base)
    assert events(d, "cache_persist_disabled"), d.log()


def test_two_daemons_sharing_a_state_folder_keep_each_others_files(
    tiny_model: Path, base: Path
) -> None:
    (base / "a").mkdir(mode=0o700)  # socket folders must be private
    (base / "b").mkdir(mode=0o700)
    args = model_args(tiny_model, base)
    a = start_daemon(base / "a" / "mlxd.sock", *args)
    b = start_daemon(base / "b" / "mlxd.sock", *args)
    try:
        for d, prompt in ((a, PROMPTS[0]), (b, PROMPTS[1])):
            with d.client() as client:
                client.generate(prompt, max_tokens=N)
        assert a.stop() == 0 and b.stop() == 0
        results = []
        for sock, prompt in (("a", PROMPTS[0]), ("b", PROMPTS[1])):
            results += run(base, tiny_model, [prompt], sock=f"{sock}/mlxd.sock")[0]
        assert_warm(results, tiny_model, PROMPTS[:2])
    finally:
        for d in (a, b):
            if d.proc.poll() is None:
                d.stop(signal.SIGKILL)


# ---------------------------------------------------------------------- 10, 11: identity


def test_weights_swapped_in_place_do_not_find_the_old_kv(
    tiny_model: Path, tiny_model_b: Path, base: Path
) -> None:
    model = base / "model"
    shutil.copytree(tiny_model, model)
    run(base, model, PROMPTS[:1])
    weights = model / "model.safetensors"
    st = weights.stat()
    other = tiny_model_b / "model.safetensors"
    assert other.stat().st_size == st.st_size
    shutil.copyfile(other, weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    results, d = run(base, model, PROMPTS[:1])
    assert_cold(results, tiny_model_b, PROMPTS[:1])
    reasons = [e["reason"] for e in events(d, "cache_file_skipped")]
    assert any("other weights" in r for r in reasons), d.log()


def test_another_models_file_is_skipped_with_a_log_line(
    tiny_model: Path, tiny_model_b: Path, base: Path
) -> None:
    args = (*model_args(tiny_model, base), "--model", f"tiny-b={tiny_model_b}")
    d = start_daemon(base / "mlxd.sock", *args)
    with d.client() as client:
        client.generate(PROMPTS[0], model="tiny", max_tokens=N)
        client.generate(PROMPTS[1], model="tiny-b", max_tokens=N)
    assert d.stop() == 0, d.log()
    model_of = {p: header(p)[0]["__metadata__"]["0.mlxd_model"] for p in saved(base)}
    [ours] = [p for p, m in model_of.items() if m == "tiny"]
    [theirs] = [p for p, m in model_of.items() if m == "tiny-b"]
    shutil.copyfile(theirs, ours)
    d = start_daemon(base / "mlxd.sock", *args)
    with d.client() as client:
        r = client.generate(PROMPTS[0], model="tiny", max_tokens=N)
    assert d.stop() == 0, d.log()
    assert_cold([r], tiny_model, PROMPTS[:1])
    reasons = [e["reason"] for e in events(d, "cache_file_skipped")]
    assert any("another model" in r for r in reasons), d.log()
