"""What ``mlxd serve`` checks before it binds its socket, so that a broken configuration
stops the daemon at once (exit 78, one line) instead of failing every request later.

Each model source must be a model: a directory with a ``config.json``, or a Hugging Face
repo id whose snapshot is in the cache (``daemon/hub.py``); ``models_dir`` must be a
directory; ``default_model`` must name a model. A repo the cache lacks is downloaded
before serving (``fetch``), unless ``HF_HUB_OFFLINE`` is set (refused, with the
``mlxd pull`` to run) or this is a SIGHUP reload (refused: the event loop downloads
nothing). Errors name the setting as the settings' own do: the file's key and line, the
variable, or the flag.

Threading: ``check`` on the main thread at start and on the loop thread on SIGHUP (it
reads the file system and the cache's folders only); ``fetch`` on the main thread.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import hub
from .settings import ConfigError, Loaded, find_line


def check(loaded: Loaded, *, download: bool) -> list[tuple[str, str]]:
    """Raise ``ConfigError`` for the first setting that names no model. Returns, as
    ``(setting, repo)``, the repos to ``fetch`` first (none unless ``download``, and none
    when ``HF_HUB_OFFLINE`` is set)."""
    config = loaded.config
    missing: list[tuple[str, str]] = []
    demo = Path(config.demo_model_dir).expanduser() if config.demo_model_dir else None
    for name, source in config.models.items():
        where = _where(loaded, f"models.{name}")
        if hub.is_repo_id(source):
            try:
                _model_folder(where, hub.model_dir(source), source)
            except hub.HubError as exc:
                if download and not hub.offline():
                    missing.append((where, source))
                    continue
                why = "HF_HUB_OFFLINE is set" if download else "a reload downloads nothing"
                raise ConfigError(f"{where}: {exc.message} ({why})") from None
        elif Path(source).expanduser() != demo:  # the demo model is built on first use
            _model_folder(where, Path(source).expanduser(), source)
    models_dir = Path(config.models_dir).expanduser() if config.models_dir else None
    if models_dir is not None and not models_dir.is_dir():
        what = "is not a directory" if models_dir.exists() else "does not exist"
        raise ConfigError(f"{_where(loaded, 'models_dir')}: {config.models_dir} {what}")
    name = config.default_model
    if name is not None and name not in config.models:
        folder = hub.folder_in(models_dir, name) if models_dir is not None else None
        if folder is None or not (folder / "config.json").is_file():
            known = ", ".join(config.models) or "none"
            inside = f" nor a model folder in {config.models_dir}" if models_dir else ""
            raise ConfigError(
                f"{_where(loaded, 'default_model')}: no model {name!r}: not in [models] "
                f"({known}){inside}"
            )
    return missing


def fetch(missing: list[tuple[str, str]], log: Any) -> None:
    """Download each repo ``check`` found missing, as mlx-lm's ``load`` would (progress
    bars on a terminal). Raises ``ConfigError`` for a repo the Hub does not have, and
    ``hub.HubError`` (``download_failed``) when it cannot be reached."""
    for where, repo in missing:
        log.info("model_downloading", repo=repo, cache=str(hub.cache_dir()))
        try:
            path = hub.download(repo, progress=sys.stderr.isatty())
            _model_folder(where, path, repo)
        except hub.HubError as exc:
            if exc.code == "download_failed":
                raise hub.HubError(exc.code, f"{where}: {exc.message}") from None
            # It may have been meant as a directory: say that there is none either.
            raise ConfigError(f"{where}: {exc.message}; nor is it a directory") from None
        log.info("model_downloaded", repo=repo, path=str(path))


def _model_folder(where: str, path: Path, source: str) -> None:
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ConfigError(f"{where}: {source} {what}")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{where}: {source} has no config.json (not an mlx-lm model)")


def _where(loaded: Loaded, key: str) -> str:
    """A setting as the user wrote it: ``FILE:LINE: key``, ``MLXD_X``, ``--flag``."""
    source = loaded.sources.get(key, "default")
    kind, _, origin = source.partition(":")
    model = key.removeprefix("models.") if key.startswith("models.") else None
    if kind == "file":
        try:
            line = find_line(Path(origin).read_text(encoding="utf-8"), key)
        except (OSError, UnicodeDecodeError):
            line = None
        return f"{origin}:{line}: {key}" if line else f"{origin}: {key}"
    if kind in ("env", "flag"):
        return f"{origin} {model}" if model is not None else origin
    return key
