"""The prompt cache on disk: saved on shutdown, restored when a model loads.

A saved entry must never be wrong, never fatal and never another user's to read:

- each entry is one mlx-lm ``save_prompt_cache`` file whose metadata carries its model,
  the identity of that model's weights (``weights.identity``: a content hash), its
  tokens, its pin, and ``mlxd_check``: a sha256 binding all of these to every tensor's
  name, dtype, shape and bytes. A file is used only if it passes every check; any other
  (corrupt, truncated, malformed, another model's, made from other weights) is skipped
  with a ``cache_file_skipped`` warning saying why;
- a save writes each file under a temporary name, fsyncs it and renames it, then fsyncs
  the folder; only when the whole new set is in place does a new manifest (written the
  same way) replace the old one, and only then are the previous save's files removed. A
  kill at any point leaves the previous save's manifest and files as they were; files a
  killed save left behind are listed as ``pending`` and removed at the next start;
- a daemon deletes only what its own manifest (``manifest-<key of its socket>.json``)
  lists, and file names carry a per-save random prefix, so daemons sharing a state
  folder keep each other's files; a ``prompt-cache`` folder that is a symlink, not a
  folder or not ours is refused (``cache_persist_disabled``), as is one we cannot read or
  whose parent others may write to: the daemon then runs without persistence;
- folders are 0700 and files 0600 whatever the umask (files are created with that mode
  before mlx writes into them).

Threading: worker thread only (it reads and writes MLX arrays).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm.models.cache as mlx_cache
import structlog
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import save_prompt_cache

from .cache import KVState, PromptCache
from .faults import Faults

log = structlog.get_logger("mlxd.persist")

FORMAT = "1"
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class Skipped(Exception):
    """A saved file that is not used; the message says why."""


class PromptCacheStore:
    def __init__(self, folder: Path, owner: str, faults: Faults | None = None) -> None:
        """``folder``: the ``prompt-cache`` folder; ``owner``: what names this daemon's
        manifest (its socket path: one daemon per socket)."""
        self.folder = folder
        self._manifest = folder / f"manifest-{_key(owner)}.json"
        self._faults = faults
        self._usable: bool | None = None
        self._restored: set[str] = set()

    # ------------------------------------------------------------------ the folder

    def usable(self) -> bool:
        """Whether the folder can be used (checked once, at first use)."""
        if self._usable is None:
            try:
                reason = self._prepare()
            except OSError as exc:
                reason = f"cannot use it: {exc!r}"
            if reason is not None:
                log.warning("cache_persist_disabled", dir=str(self.folder), reason=reason)
            self._usable = reason is None
        return self._usable

    def _prepare(self) -> str | None:
        _make_private(self.folder.parent)
        _make_private(self.folder)
        st = os.lstat(self.folder)
        if stat.S_ISLNK(st.st_mode):
            return "it is a symlink"
        if not stat.S_ISDIR(st.st_mode):
            return "it is not a folder"
        if st.st_uid != os.geteuid():
            return f"it is owned by uid {st.st_uid}, not by us"
        if st.st_mode & 0o077:
            os.chmod(self.folder, 0o700)  # made by an older mlxd, with the umask's mode
        parent = os.stat(self.folder.parent)
        if parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX:
            # Anyone who may write there could swap our folder for a symlink.
            return "the state folder is writable by other users"
        manifest = self._read_manifest()
        if manifest["pending"]:  # what a killed save left behind
            self._remove(n for n in manifest["pending"] if n not in _names(manifest))
            self._write_manifest(manifest["files"], [])
        return None

    # ------------------------------------------------------------------ saving

    def save(self, cache: PromptCache, identities: dict[str, str], max_bytes: int) -> int:
        """Write the most recently used entries, pins first, up to ``max_bytes``, for the
        models in ``identities`` (name -> identity of its weights); keep the previous
        save's files of models this daemon never loaded. Returns the entries written.
        Raises on failure, having removed what it wrote."""
        if not self.usable():
            return 0
        newest_first = cache.stored()
        ordered = [e for e in newest_first if e.pinned] + [e for e in newest_first if not e.pinned]
        prefix = secrets.token_hex(4)
        plan: list[tuple[Any, str, str]] = []
        total = 0
        ranks: dict[str, int] = {}
        for entry in ordered:
            identity = identities.get(entry.model)
            if identity is None or total + entry.nbytes > max_bytes:
                continue
            rank = ranks[entry.model] = ranks.get(entry.model, -1) + 1
            plan.append((entry, identity, f"{prefix}-{_key(entry.model)}-{rank:05d}.safetensors"))
            total += entry.nbytes
        old = self._read_manifest()
        names = [name for _, _, name in plan]
        pending = names + [_tmp(n) for n in names]
        self._write_manifest(old["files"], old["pending"] + pending)
        written: list[dict[str, str]] = []
        try:
            for entry, identity, name in plan:
                if self._faults and self._faults.hit("save_stall"):
                    log.warning("fault_save_stall", file=name)
                    time.sleep(60)
                _write_entry(self.folder, name, entry, identity)
                written.append({"name": name, "model": entry.model})
            _fsync(self.folder)
            kept = self._carried_over(old["files"], identities, max_bytes - total)
            self._write_manifest(written + kept, [])
        except BaseException:
            self._remove(pending)
            with contextlib.suppress(OSError):
                self._write_manifest(old["files"], old["pending"])
            raise
        self._remove(n for n in _names(old) | set(old["pending"]) if n not in _names_of(kept))
        return len(written)

    def _carried_over(
        self, files: list[dict[str, str]], identities: dict[str, str], room: int
    ) -> list[dict[str, str]]:
        """The previous save's files of models neither resident nor restored (never loaded
        by this daemon: their entries are still only on disk), while within ``room``."""
        kept = []
        for item in files:
            if item["model"] in identities or item["model"] in self._restored:
                continue
            with contextlib.suppress(OSError):
                size = os.lstat(self.folder / item["name"]).st_size
                if size <= room:
                    kept.append(item)
                    room -= size
        return kept

    # ------------------------------------------------------------------ restoring

    def restore(self, cache: PromptCache, model: str, identity: str) -> int:
        """Insert the saved entries of ``model`` that pass every check, newest ending most
        recently used; skip the others with a warning. Returns how many were restored."""
        if not self.usable():
            return 0
        self._restored.add(model)
        restored = 0
        mine = [f for f in self._read_manifest()["files"] if f["model"] == model]
        for item in reversed(mine):
            try:
                tokens, state, pin_until = _read_entry(self.folder / item["name"], model, identity)
            except Exception as exc:  # a bad file must never stop the daemon
                reason = str(exc) if isinstance(exc, Skipped) else repr(exc)
                log.warning("cache_file_skipped", file=item["name"], model=model, reason=reason)
                continue
            if cache.insert(model, tokens, state, pin_until=pin_until):
                restored += 1
        return restored

    # ------------------------------------------------------------------ the manifest

    def _read_manifest(self) -> dict[str, list[Any]]:
        empty: dict[str, list[Any]] = {"files": [], "pending": []}
        try:
            data = json.loads(self._manifest.read_bytes())
            files, pending = data["files"], data["pending"]
            if not (
                data.get("format") == FORMAT
                and isinstance(files, list)
                and all(
                    isinstance(f, dict) and _safe_name(f.get("name")) and _is_str(f.get("model"))
                    for f in files
                )
                and isinstance(pending, list)
                and all(_safe_name(n) for n in pending)
            ):
                raise Skipped("not a manifest of this format")
        except FileNotFoundError:
            return empty
        except Exception as exc:
            # Its files are then left alone: never delete what no valid manifest lists.
            log.warning("cache_file_skipped", file=self._manifest.name, reason=repr(exc))
            return empty
        return {"files": files, "pending": pending}

    def _write_manifest(self, files: list[dict[str, str]], pending: list[str]) -> None:
        body = json.dumps({"format": FORMAT, "files": files, "pending": pending}).encode()
        tmp = self.folder / _tmp(self._manifest.name)
        tmp.unlink(missing_ok=True)
        try:
            with os.fdopen(os.open(tmp, _FLAGS, 0o600), "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._manifest)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half manifest
            raise
        _fsync(self.folder)

    def _remove(self, names: Any) -> None:
        for name in names:
            with contextlib.suppress(OSError):
                (self.folder / name).unlink()


# ---------------------------------------------------------------------- one entry


def _write_entry(folder: Path, name: str, entry: Any, identity: str) -> None:
    tokens = json.dumps(list(entry.tokens))
    pin = repr(entry.pin_until if entry.pinned else 0.0)
    classes = [type(c).__name__ for c in entry.state]
    arrays, scalars = _as_saved(entry.state)
    check = _check(entry.model, identity, tokens, pin, [classes, scalars], arrays)
    meta = {
        "mlxd_format": FORMAT,
        "mlxd_model": entry.model,
        "mlxd_identity": identity,
        "mlxd_tokens": tokens,
        "mlxd_pin_until": pin,
        "mlxd_check": check,
    }
    tmp = folder / _tmp(name)
    os.close(os.open(tmp, _FLAGS, 0o600))  # mlx then writes into it, keeping the mode
    save_prompt_cache(str(tmp), entry.state, meta)
    _fsync(tmp)
    os.replace(tmp, folder / name)


def _read_entry(path: Path, model: str, identity: str) -> tuple[list[int], KVState, float]:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise Skipped("not a regular file of ours")
    arrays, flat = mx.load(str(path), return_metadata=True)
    if not isinstance(arrays, dict) or not isinstance(flat, dict):
        raise Skipped("not a safetensors file")
    meta, classes, scalars = tree_unflatten(list(flat.items()))
    keys = ("mlxd_format", "mlxd_model", "mlxd_identity", "mlxd_tokens", "mlxd_pin_until")
    if not isinstance(meta, dict) or not all(_is_str(meta.get(k)) for k in (*keys, "mlxd_check")):
        raise Skipped("its metadata lacks mlxd's keys")
    if meta["mlxd_format"] != FORMAT:
        raise Skipped(f"format {meta['mlxd_format']!r}, not {FORMAT!r}")
    if meta["mlxd_model"] != model:
        raise Skipped(f"another model's entry ({meta['mlxd_model']!r})")
    if meta["mlxd_identity"] != identity:
        raise Skipped("other weights: made with other weights of this model")
    tokens = json.loads(meta["mlxd_tokens"])
    if not (
        isinstance(tokens, list)
        and tokens
        and all(type(t) is int and 0 <= t < 2**31 for t in tokens)
    ):
        raise Skipped("its tokens are not a list of token ids")
    pin_until = float(meta["mlxd_pin_until"])
    if math.isnan(pin_until):
        raise Skipped("its pin is not a time")
    if not isinstance(classes, list) or not all(_is_str(c) for c in classes):
        raise Skipped("its cache classes are not names")
    layout = [classes, scalars]
    check = _check(model, identity, meta["mlxd_tokens"], meta["mlxd_pin_until"], layout, arrays)
    if check != meta["mlxd_check"]:
        raise Skipped("integrity check failed: its tokens, model or tensors are not as saved")
    return tokens, _rebuild(arrays, classes, scalars), pin_until


def _rebuild(arrays: dict[str, Any], classes: list[str], scalars: Any) -> KVState:
    """mlx-lm's ``load_prompt_cache``, on arrays already read and checked; a class is one of
    mlx-lm's cache classes, never another name found in its module."""
    for pos, kind in scalars[1:]:
        array = arrays[pos]
        if kind == "scalar":
            arrays[pos] = array.item()
        elif kind == "string":
            arrays[pos] = "".join(chr(i) for i in array.tolist())
        elif kind == "none":
            arrays[pos] = None
        else:
            raise Skipped(f"unknown scalar type {kind!r}")
    states = tree_unflatten(list(arrays.items()))
    state = []
    for name, s in zip(classes, states, strict=True):
        cls = getattr(mlx_cache, name, None)
        if not (isinstance(cls, type) and issubclass(cls, mlx_cache._BaseCache)):
            raise Skipped(f"unknown cache class {name!r}")
        state.append(cls.from_state(s))
    mx.eval([c.state for c in state])
    return state


def _as_saved(state: KVState) -> tuple[dict[str, mx.array], list[Any]]:
    """The arrays ``save_prompt_cache`` writes for ``state``, by name, and its list of
    scalars (converted as it converts them): what the check binds."""
    out = {}
    scalars: list[Any] = [""]
    for key, value in tree_flatten([c.state for c in state]):
        if isinstance(value, mx.array):
            out[key] = value
            continue
        if isinstance(value, str):
            kind, value = "string", mx.array([ord(ch) for ch in value])
        elif value is None:
            kind, value = "none", mx.array([])
        else:
            kind, value = "scalar", mx.array(value)
        scalars.append([key, kind])
        out[key] = value
    return out, scalars


def _check(
    model: str, identity: str, tokens: str, pin: str, layout: list[Any], arrays: dict[str, Any]
) -> str:
    """sha256 of everything an entry is: its metadata, cache layout and every tensor."""
    digest = hashlib.sha256(json.dumps([FORMAT, model, identity, tokens, pin, layout]).encode())
    for key in sorted(arrays):
        a = arrays[key]
        if not isinstance(a, mx.array):
            raise Skipped(f"tensor {key!r} is not an array")
        a = mx.contiguous(a)
        mx.eval(a)
        digest.update(json.dumps([key, str(a.dtype), list(a.shape)]).encode())
        # memoryview works for every dtype (bfloat16 too), with no copy.
        digest.update(memoryview(a))
    return digest.hexdigest()


# ---------------------------------------------------------------------- files


def _make_private(folder: Path) -> None:
    """Create ``folder`` 0700 (its missing parents with the umask's mode), whatever the
    umask; an existing one is left as it is."""
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return
    os.chmod(folder, 0o700)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp(name: str) -> str:
    # mlx adds ".safetensors" to a name without it: the temporary name keeps the suffix.
    return f"tmp-{name}"


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _safe_name(value: Any) -> bool:
    """A bare file name: a manifest never makes us touch a path outside the folder."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value


def _names(manifest: dict[str, list[Any]]) -> set[str]:
    return _names_of(manifest["files"])


def _names_of(files: list[dict[str, str]]) -> set[str]:
    return {f["name"] for f in files}
