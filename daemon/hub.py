"""Models by name: Hugging Face repo ids, resolved through ``huggingface_hub``'s cache as
mlx-lm's own ``load`` does; ``mlxd pull`` and the cache's part of ``mlxd models``; and the
one rule for a name that is a folder of ``models_dir`` (``folder_in``), which the registry
serves and ``mlxd serve`` checks at start.

A model source (a ``[models]`` value, ``--model NAME=SOURCE``) is a repo id when it names
no existing path and has the form ``namespace/name`` (mlx-lm's rule: ``load`` downloads
whatever is not a path). A repo id is looked up in the cache (``HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) with the files mlx-lm fetches
(``ALLOW_PATTERNS``); the daemon never downloads while it serves: ``mlxd serve``
downloads what the cache lacks before it binds its socket (refused when
``HF_HUB_OFFLINE`` is set), and ``mlxd pull`` ahead of time.

Threading: ``is_repo_id`` anywhere; ``model_dir`` (no network) on the worker thread, and
on the main or the loop thread while the configuration is checked; ``download`` and the
CLI commands on the main thread. Nothing here imports MLX; ``huggingface_hub`` is
imported where it is used, so ``settings`` may use ``is_repo_id`` at no cost.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import msgspec

ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
"""The files of a repo mlx-lm's ``load`` downloads (``mlx_lm.utils.DEFAULT_ALLOW_PATTERNS``;
a test keeps the two the same), copied so that ``mlxd pull`` need not import MLX."""

# huggingface_hub's validate_repo_id, with the namespace required: "gpt2" is a model name.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubError(Exception):
    """A repo that cannot be had: ``code`` is ``not_in_cache``, ``repo_not_found`` or
    ``download_failed``; the message is one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class CachedRepo(msgspec.Struct, frozen=True):
    repo: str
    bytes: int
    """Its blobs' size on disk, every cached revision together."""
    path: str
    """The snapshot mlxd loads (``refs/main``'s), else the repo's folder in the cache."""


def looks_like_repo_id(text: str) -> bool:
    """``namespace/name``, as the Hub spells repo ids."""
    return (
        len(text) <= 96
        and _REPO_ID.fullmatch(text) is not None
        and not ("--" in text or ".." in text or text.endswith(".git"))
    )


def is_repo_id(source: str, base: Path | None = None) -> bool:
    """Whether a model source is a Hugging Face repo id rather than a path: no such path
    (relative ones under ``base`` when given), and of the form ``namespace/name``."""
    path = (base / source) if base is not None else Path(source)
    return looks_like_repo_id(source) and not path.exists()


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: huggingface_hub makes no request."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def model_dir(repo: str) -> Path:
    """The cached snapshot of ``repo`` with every file mlx-lm would fetch, found without
    the network (as ``mlx_lm.utils.hf_repo_to_path``). Raises ``HubError``
    (``not_in_cache``) when the cache lacks it or holds only part of it."""
    from huggingface_hub import errors, snapshot_download

    # An older huggingface_hub has no IncompleteSnapshotError: it returns what is there.
    incomplete = getattr(errors, "IncompleteSnapshotError", ())
    try:
        path = snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, local_files_only=True)
    except incomplete:
        where = f"only partly in the Hugging Face cache ({cache_dir()})"
    except (OSError, ValueError):  # LocalEntryNotFoundError, HFValidationError
        where = f"not in the Hugging Face cache ({cache_dir()})"
    else:
        return Path(path)
    raise HubError("not_in_cache", f"{repo} is {where}; run: mlxd pull {repo}")


def source_dir(source: str) -> Path:
    """A model source's directory: the path itself, or a repo id's cached snapshot."""
    return model_dir(source) if is_repo_id(source) else Path(source).expanduser()


def folder_in(models_dir: Path, name: str) -> Path | None:
    """The folder ``name`` names directly inside ``models_dir``, if there is one: never a
    path out of it (``..``, a slash)."""
    if name in ("", ".", "..") or "/" in name:
        return None
    try:
        candidate = (models_dir / name).resolve()
        if candidate.parent == models_dir.resolve() and candidate.is_dir():
            return candidate
    except (OSError, ValueError):  # a NUL byte, a name too long for the file system
        pass
    return None


def download(repo: str, progress: bool = True) -> Path:
    """Fetch what the cache lacks of ``repo`` (what mlx-lm's ``load`` would), with
    huggingface_hub's progress bars on stderr when ``progress``; its snapshot folder.
    Raises ``HubError``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        return Path(snapshot_download(repo, allow_patterns=ALLOW_PATTERNS))
    except GatedRepoError:
        code, why = "repo_not_found", "gated: accept its terms on the Hub, then hf auth login"
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):
        code, why = "repo_not_found", "no such repository on the Hub (private? hf auth login)"
    except LocalEntryNotFoundError as exc:
        if offline():
            code, why = "not_in_cache", f"not in {cache_dir()}, and HF_HUB_OFFLINE is set"
        else:
            cause = exc.__cause__ or exc
            code, why = "download_failed", f"the Hub cannot be reached: {_first_line(cause)}"
    except Exception as exc:  # an HTTP error, a full disk: one line, not a traceback
        code, why = "download_failed", f"{type(exc).__name__}: {_first_line(exc)}"
    raise HubError(code, f"{repo}: {why}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def cached_repos() -> list[CachedRepo]:
    """The model repos the cache holds (``huggingface_hub.scan_cache_dir``), by repo id."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    repos = []
    for r in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if r.repo_type != "model":
            continue
        main = [rev for rev in r.revisions if "main" in rev.refs]
        latest = main or sorted(r.revisions, key=lambda rev: rev.last_modified)[-1:]
        path = latest[0].snapshot_path if latest else r.repo_path
        repos.append(CachedRepo(repo=r.repo_id, bytes=r.size_on_disk, path=str(path)))
    return repos


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------- the CLI


def add_parsers(commands: Any, command: Any) -> None:
    """``mlxd pull``, and ``--cached`` on ``mlxd models`` (made by ``command``)."""
    pull = commands.add_parser(
        "pull",
        help="download a Hugging Face model into the cache, for --model NAME=REPO",
        description="download the files mlx-lm loads of a Hugging Face repo into the "
        "Hugging Face cache (HF_HUB_CACHE, HF_HOME), so a daemon can serve it offline",
    )
    pull.add_argument("repo", help="a repo id, e.g. mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit")
    models = command("models", "list the daemon's models, then the Hugging Face cache's")
    models.add_argument("--json", action="store_true", help="print one JSON object")
    models.add_argument(
        "--cached", action="store_true", help="only the Hugging Face cache (no daemon needed)"
    )


def pull(args: argparse.Namespace) -> int:
    repo = args.repo
    if not looks_like_repo_id(repo):
        message = f"{repo!r} is not a repo id (namespace/name)"
        print(f"mlxd: error: invalid_request: {message}", file=sys.stderr)
        return 2
    try:
        path = download(repo, progress=sys.stderr.isatty())
    except HubError as exc:
        print(f"mlxd: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"{repo}\tcached {_size(size)}\t{path}")
    return 0


def models(args: argparse.Namespace, daemon_models: Any) -> int:
    """``mlxd models``: ``daemon_models()`` (the daemon's list; skipped with ``--cached``),
    then the cache's repos."""
    infos = None if args.cached else daemon_models()
    cached = cached_repos()
    if args.json:
        out: dict[str, Any] = {"cached": cached}
        if infos is not None:
            out = {"models": infos, **out}
        print(msgspec.json.encode(out).decode())
        return 0
    for m in infos or []:
        state = f"resident {m.bytes / 2**20:.1f} MiB" if m.resident else "not loaded"
        print(f"{m.name}\t{state}\t{m.path}")
    for c in cached:
        print(f"{c.repo}\tcached {_size(c.bytes)}\t{c.path}")
    return 0
