"""Where the daemon's ``Config`` comes from: defaults < the TOML file < ``MLXD_*`` < flags.

The file (``~/.config/mlxd/config.toml``, honouring ``XDG_CONFIG_HOME``; on macOS
``~/Library/Application Support/mlxd/config.toml``; ``--config`` or ``MLXD_CONFIG`` name
another) is parsed with ``tomllib`` and validated by msgspec against ``FileSchema``, which
refuses unknown keys. Environment variables and flags are validated against the same schema,
so a bad value is named the same way wherever it came from: the file's key and line, the
variable, or the flag. ``load`` returns the ``Config`` and, for ``mlxd config show``, where
each value came from. On SIGHUP the server calls ``load`` again with the environment and
flags it started with; ``RESTART_KEYS`` cannot change without a restart.

Threading: pure functions of their arguments (and the file); called on the main thread at
start-up and on the event loop thread on SIGHUP.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import msgspec

from . import model_options
from .config import DEMO_MODEL_NAME, Config, default_demo_model_dir
from .hub import is_repo_id
from .model_options import ModelOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_ENV = "MLXD_CONFIG"
MODELS_ENV = "MLXD_MODELS"

_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
SIZE_HINT = "bytes, or e.g. '512M', '8G'"
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)


def parse_bytes(text: str) -> int:
    """``8G``, ``512M``, ``1.5g``, ``4GiB``, ``100B`` or a plain byte count; ValueError for
    anything else (a negative size among them)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size ({SIZE_HINT})")
    return int(float(m.group(1)) * _SIZE_SUFFIXES[(m.group(2) or "").lower()])


def default_config_path() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlxd" / "config.toml"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mlxd" / "config.toml"


# ---------------------------------------------------------------------- the file's schema

# TOML has no null: None below only means "not given here", so a lower layer's value stands.
Size = Union[Annotated[int, msgspec.Meta(ge=0)], str]  # noqa: UP007 - msgspec needs a Union
"""Bytes: a count, or a string with a suffix (``"8G"``)."""
Positive = Annotated[int, msgspec.Meta(ge=1)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class CacheSection(_Strict):
    max_bytes: Size | None = None
    """KV state the prompt cache may hold, across all models; 0 disables it."""
    max_entries: Count | None = None
    kv_bits: Literal[2, 3, 4, 5, 6, 8] | None = None
    """Store entries quantized to this many bits (off by default)."""
    kv_group_size: Literal[32, 64, 128] | None = None
    persist: bool | None = None
    """Save the prompt cache on shutdown and restore it when a model loads."""
    persist_max_bytes: Size | None = None


class LimitsSection(_Strict):
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024)] | str | None = None
    max_tokens: Positive | None = None
    """The largest ``max_tokens`` a request may ask for."""
    max_prompt_tokens: Positive | None = None
    """The longest prompt accepted (default: each model's context)."""
    max_queued: Count | None = None
    max_batch_size: Positive | None = None
    prefill_batch_size: Positive | None = None
    prefill_step_size: Positive | None = None
    max_connections: Positive | None = None
    handshake_timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """Seconds a new connection has to send ``hello`` before it is closed."""
    max_requests_per_connection: Positive | None = None


class LogSection(_Strict):
    level: LogLevel | None = None
    format: Literal["auto", "json", "console"] | None = None


class FileSchema(_Strict):
    socket: str | None = None
    state_dir: str | None = None
    models_dir: str | None = None
    default_model: str | None = None
    memory_budget: Size | None = None
    keep_alive: Annotated[float, msgspec.Meta(ge=-1)] | None = None
    memory_headroom: Annotated[float, msgspec.Meta(ge=0, lt=1)] | None = None
    """Fraction of the memory budget kept for what the accounting does not see."""
    pinned_models: list[str] | None = None
    """Models never unloaded once loaded (keep-alive forever, never evicted for room)."""
    background_aging: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """Seconds after which a waiting background request counts as interactive."""
    shutdown_grace: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """Seconds requests in flight get to finish on SIGTERM."""
    stall_timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """Seconds one worker round may take before the daemon exits 1 to be restarted."""
    allow_root: bool | None = None
    distributed: bool | None = None
    """Serve one model across the ranks of ``mlx.launch`` (daemon/lockstep.py)."""
    http: str | None = None
    """``HOST:PORT`` or ``unix:PATH``: the HTTP API's listener."""
    api_key_file: str | None = None
    blas: Literal["auto", "system", "bundled"] | None = None
    """Linux: the BLAS MLX multiplies with (daemon/blas.py)."""
    models: dict[str, str] = msgspec.field(default_factory=dict)
    """Model name -> mlx-lm model directory, or Hugging Face repo id (``daemon/hub.py``)."""
    model_options: dict[str, ModelOptions] = msgspec.field(default_factory=dict)
    """Model name -> its options (daemon/model_options.py); from the file only."""
    cache: CacheSection = CacheSection()
    limits: LimitsSection = LimitsSection()
    log: LogSection = LogSection()


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    """Its dotted key in the file, and its name in ``mlxd config show``."""
    field: str
    """The ``Config`` field it sets."""
    flag: str
    """The ``mlxd serve`` flag; its argparse ``dest`` is derived from it."""
    size: bool = False
    """A byte size: ``"8G"`` or a count."""
    path: bool = False
    """A path: relative ones in the file are relative to the file's folder."""

    @property
    def env(self) -> str:
        return "MLXD_" + self.key.removeprefix("limits.").replace(".", "_").upper()

    @property
    def dest(self) -> str:
        return (
            "cache_persist"
            if self.flag == "--no-cache-persist"
            else self.flag[2:].replace("-", "_")
        )


SETTINGS: tuple[Setting, ...] = (
    Setting("socket", "socket_path", "--socket", path=True),
    Setting("state_dir", "state_dir", "--state-dir", path=True),
    Setting("models_dir", "models_dir", "--models-dir", path=True),
    Setting("default_model", "default_model", "--default-model"),
    Setting("memory_budget", "memory_budget_bytes", "--memory-budget", size=True),
    Setting("keep_alive", "keep_alive_s", "--keep-alive"),
    Setting("memory_headroom", "memory_headroom", "--memory-headroom"),
    Setting("pinned_models", "pinned_models", "--pin-model"),
    Setting("background_aging", "background_aging_s", "--background-aging"),
    Setting("shutdown_grace", "shutdown_grace_s", "--shutdown-grace"),
    Setting("stall_timeout", "stall_timeout_s", "--stall-timeout"),
    Setting("allow_root", "allow_root", "--allow-root"),
    Setting("distributed", "distributed", "--distributed"),
    Setting("http", "http", "--http"),
    Setting("api_key_file", "api_key_file", "--api-key-file", path=True),
    Setting("blas", "blas", "--blas"),
    Setting("cache.max_bytes", "cache_max_bytes", "--cache-max-bytes", size=True),
    Setting("cache.max_entries", "cache_max_entries", "--cache-max-entries"),
    Setting("cache.kv_bits", "cache_kv_bits", "--cache-kv-bits"),
    Setting("cache.kv_group_size", "cache_kv_group_size", "--cache-kv-group-size"),
    Setting("cache.persist", "cache_persist", "--no-cache-persist"),
    Setting(
        "cache.persist_max_bytes", "cache_persist_max_bytes", "--cache-persist-max-bytes", size=True
    ),
    Setting("limits.max_frame_bytes", "max_frame_bytes", "--max-frame-bytes", size=True),
    Setting("limits.max_tokens", "max_tokens_limit", "--max-tokens-limit"),
    Setting("limits.max_prompt_tokens", "max_prompt_tokens", "--max-prompt-tokens"),
    Setting("limits.max_queued", "max_queued", "--max-queued"),
    Setting("limits.max_batch_size", "max_batch_size", "--max-batch-size"),
    Setting("limits.prefill_batch_size", "prefill_batch_size", "--prefill-batch-size"),
    Setting("limits.prefill_step_size", "prefill_step_size", "--prefill-step-size"),
    Setting("limits.max_connections", "max_connections", "--max-connections"),
    Setting("limits.handshake_timeout", "handshake_timeout_s", "--handshake-timeout"),
    Setting(
        "limits.max_requests_per_connection",
        "max_requests_per_connection",
        "--max-requests-per-connection",
    ),
    Setting("log.level", "log_level", "--log-level"),
    Setting("log.format", "log_format", "--log-format"),
)
_BY_KEY = {s.key: s for s in SETTINGS}

RESTART_KEYS = ("socket", "state_dir", "http", "api_key_file", "blas")
"""Settings a running daemon cannot change: SIGHUP logs them as needing a restart."""


class ConfigError(Exception):
    """An invalid configuration; the message is one line naming the key and where it is."""


@dataclass(frozen=True, slots=True)
class Loaded:
    config: Config
    sources: dict[str, str]
    """Each key (``limits.max_tokens``, ``models.NAME``) -> ``default``, ``file:PATH``,
    ``env:MLXD_X`` or ``flag:--x``."""
    path: Path
    """The file looked for (it may not exist)."""
    path_from: str
    """Why that file: ``default``, ``env:MLXD_CONFIG`` or ``flag:--config``."""
    file_found: bool


# ---------------------------------------------------------------------- loading

Layer = tuple[dict[str, tuple[Any, str]], dict[str, tuple[str, str]]]
"""(key -> (value, source), model name -> (directory, source)): what one layer sets."""


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Loaded:
    """The effective configuration. ``flags`` maps argparse dests to values (None: not
    given), ``env`` is the environment (``os.environ`` by default), ``config_path`` the
    ``--config`` flag. Raises ``ConfigError``."""
    env = os.environ if env is None else env
    flags = flags or {}
    if config_path:
        path, path_from = Path(config_path).expanduser(), "flag:--config"
    elif env.get(CONFIG_ENV):
        path, path_from = Path(env[CONFIG_ENV]).expanduser(), f"env:{CONFIG_ENV}"
    else:
        path, path_from = default_config_path(), "default"

    defaults = Config()
    values: dict[str, Any] = {s.key: getattr(defaults, s.field) for s in SETTINGS}
    sources = dict.fromkeys(values, "default")
    models: dict[str, tuple[str, str]] = {}  # name -> (directory, source)

    found = path.is_file()
    if not found and path_from != "default":
        raise ConfigError(f"{path}: no such configuration file ({path_from})")
    layers = [_file_layer(path)] if found else []
    layers += [_env_layer(env), _flag_layer(flags)]
    for layer, layer_models in layers:  # lowest first: each overrides the ones before
        for key, (value, source) in layer.items():
            values[key] = value
            sources[key] = source
        models.update(layer_models)

    options = values.pop("model_options", {})
    option_source = sources.pop("model_options", "default")
    fields = {_BY_KEY[k].field: v for k, v in values.items()}
    fields["model_options"] = options
    sources.update({f"model_options.{name}": option_source for name in options})
    fields["models"] = {name: d for name, (d, _) in models.items()}
    for name, (_, source) in models.items():
        sources[f"models.{name}"] = source
    if not fields["models"] and not fields["models_dir"]:
        # Nothing to serve: the built-in demo model, built on first use.
        demo_dir = str(default_demo_model_dir())
        fields["models"] = {DEMO_MODEL_NAME: demo_dir}
        fields["demo_model_dir"] = demo_dir
        sources[f"models.{DEMO_MODEL_NAME}"] = "default"
    return Loaded(Config(**fields), sources, path, path_from, found)


def _flatten(
    parsed: FileSchema, where: Callable[[str], str], base: Path | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """(key -> value, model name -> directory) of what ``parsed`` sets; ``where(key)``
    names a key in an error message (its line, its variable, its flag)."""
    out: dict[str, Any] = {}
    for s in SETTINGS:
        value: Any = parsed
        for part in s.key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        if s.size and isinstance(value, str):
            try:
                value = parse_bytes(value)
            except ValueError as exc:
                raise ConfigError(f"{where(s.key)}: {exc}") from None
        if s.path and base is not None:
            value = _relative_to(value, base)
        out[s.key] = value
    if parsed.model_options:
        out["model_options"] = dict(parsed.model_options)
    # A repo id stays one: relative to the file's folder only what is a path there.
    models = {
        name: d if base is None or is_repo_id(d, base) else _relative_to(d, base)
        for name, d in parsed.models.items()
    }
    return out, models


def _relative_to(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _file_layer(path: Path) -> Layer:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _lower_log_level(raw)

    def where(key: str) -> str:
        line = find_line(text, key)
        return f"{path}:{line}: {key}" if line else f"{path}: {key}"

    try:
        parsed = msgspec.convert(raw, FileSchema)
    except msgspec.ValidationError as exc:
        key, message = _error_key(exc, raw)
        raise ConfigError(f"{where(key)}: {message}") from None
    values, models = _flatten(parsed, where, base=path.parent)
    source = f"file:{path}"
    return (
        {k: (v, source) for k, v in values.items()},
        {n: (d, source) for n, d in models.items()},
    )


def _env_layer(env: Mapping[str, str]) -> Layer:
    raw: dict[str, Any] = {}
    names: dict[str, str] = {}  # key -> the variable that set it
    for s in SETTINGS:
        value = env.get(s.env)
        if value:  # empty means unset, as shells make it easy to blank a variable
            _put(raw, s.key, value)
            names[s.key] = s.env
    models: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in env.get(MODELS_ENV, "").split(","))):
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"{MODELS_ENV}: expected NAME=DIR[,NAME=DIR...], got {item!r}")
        models[name] = directory
    if models:
        raw["models"] = models
    _lower_log_level(raw)

    def where(key: str) -> str:
        if key.startswith("models"):
            return MODELS_ENV
        return f"{names.get(key, key)}={env.get(names.get(key, ''), '')!r}"

    try:
        # Not strict: "32" is an int here, "true" a bool.
        parsed = msgspec.convert(raw, FileSchema, strict=False)
    except msgspec.ValidationError as exc:
        key, message = _error_key(exc, raw)
        raise ConfigError(f"{where(key)}: {message}") from None
    values, models = _flatten(parsed, where)
    return (
        {k: (v, f"env:{names[k]}") for k, v in values.items()},
        {n: (d, f"env:{MODELS_ENV}") for n, d in models.items()},
    )


def _flag_layer(flags: Mapping[str, Any]) -> Layer:
    raw: dict[str, Any] = {}
    for s in SETTINGS:
        value = flags.get(s.dest)
        if value is not None:
            _put(raw, s.key, value)
    models = dict(flags.get("model") or [])
    if models:
        raw["models"] = models
    _lower_log_level(raw)

    def where(key: str) -> str:
        return "--model" if key.startswith("models") else _BY_KEY[key].flag

    try:
        parsed = msgspec.convert(raw, FileSchema)
    except msgspec.ValidationError as exc:
        key, message = _error_key(exc, raw)
        raise ConfigError(f"{where(key)}: {message}") from None
    values, models = _flatten(parsed, where)
    return (
        {k: (v, f"flag:{_BY_KEY[k].flag}") for k, v in values.items()},
        {n: (d, "flag:--model") for n, d in models.items()},
    )


def _put(raw: dict[str, Any], key: str, value: Any) -> None:
    *tables, last = key.split(".")
    for t in tables:
        raw = raw.setdefault(t, {})
    raw[last] = value


def _lower_log_level(raw: dict[str, Any]) -> None:
    log = raw.get("log")
    if isinstance(log, dict) and isinstance(log.get("level"), str):
        log["level"] = log["level"].lower()


_AT = re.compile(r" - at `\$([^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]+)`")


def _error_key(exc: msgspec.ValidationError, raw: dict[str, Any]) -> tuple[str, str]:
    """The dotted key a msgspec error is about (``$.limits.max_tokens`` -> ``limits.
    max_tokens``; an unknown field is named whole), and the message without the path."""
    text = str(exc)
    at = _AT.search(text)
    path = at.group(1) if at else ""
    message = text[: at.start()] if at else text
    key = path.lstrip(".")
    if key.startswith("model_options["):  # msgspec says `[...]` for a table's entry
        name = model_options.bad_entry(raw.get("model_options") or {})
        key = f"model_options.{name}{key.partition(']')[2]}" if name else "model_options"
    unknown = _UNKNOWN.match(message)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        message = "unknown key"
    elif key.startswith("models["):
        # msgspec says `$.models[...]` for a dict value: name the entry.
        bad = [n for n, d in (raw.get("models") or {}).items() if not isinstance(d, str)]
        key = f"models.{bad[0]}" if bad else "models"
    if message.startswith("Invalid enum value") and (choices := _choices(key)):
        message += f"; expected one of {', '.join(map(str, choices))}"
    # TOML cannot say null, so "| null" in msgspec's expected types only confuses.
    return key, message.replace(" | null", "")


def _choices(key: str) -> tuple[str, ...]:
    """The values a ``Literal`` key of ``FileSchema`` may take; () for any other key."""
    hint: Any = FileSchema
    for part in key.split("."):
        if get_origin(hint) is dict:  # a table of names (model_options.NAME): its values
            hint = get_args(hint)[1]
            continue
        try:
            hint = get_type_hints(hint)[part]
        except (TypeError, KeyError):
            return ()
        if get_origin(hint) in (Union, UnionType):  # X | None: X
            hint = next((a for a in get_args(hint) if a is not type(None)), hint)
    return get_args(hint) if get_origin(hint) is Literal else ()


_TABLE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _key_parts(text: str) -> list[str]:
    return [p.strip().strip("\"'") for p in re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)]


def find_line(text: str, key: str) -> int | None:
    """The 1-based line that sets ``key`` (dotted) in TOML ``text``, or the line of the
    closest table that holds it; None if neither appears."""
    target = key.split(".")
    table: list[str] = []
    best: tuple[int, int] | None = None  # (parts matched, line)
    for number, line in enumerate(text.splitlines(), start=1):
        m = _TABLE.match(line)
        if m:
            table = _key_parts(m.group(1))
            here = table
        else:
            k = _KEY.match(line)
            if not k:
                continue
            here = table + _key_parts(k.group(1))
        if here == target:
            return number
        n = len(here)
        if n < len(target) and target[:n] == here and (best is None or n > best[0]):
            best = (n, number)
    return best[1] if best else None


def configured_socket(env: Mapping[str, str] | None = None) -> Path | None:
    """The configuration file's ``socket``, for client commands; None when there is no file,
    no such key, or the file cannot be read (a client never fails on the daemon's file)."""
    env = os.environ if env is None else env
    path = Path(env[CONFIG_ENV]).expanduser() if env.get(CONFIG_ENV) else default_config_path()
    try:
        value = tomllib.loads(path.read_text(encoding="utf-8")).get("socket")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return Path(_relative_to(value, path.parent)) if isinstance(value, str) else None


# ---------------------------------------------------------------------- reloading


def changed_keys(old: Config, new: Config) -> list[str]:
    """The settings (and model aliases) that differ between two configs."""
    keys = [s.key for s in SETTINGS if getattr(old, s.field) != getattr(new, s.field)]
    for name in sorted(set(old.models) | set(new.models)):
        if old.models.get(name) != new.models.get(name):
            keys.append(f"models.{name}")
    return keys + model_options.changed(old.model_options, new.model_options)


def keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the settings that need a restart put back to ``old``'s, and their keys
    where they differed."""
    fields = {_BY_KEY[k].field: getattr(old, _BY_KEY[k].field) for k in RESTART_KEYS}
    fields["demo_model_dir"] = old.demo_model_dir
    differ = [
        k for k in RESTART_KEYS if getattr(new, _BY_KEY[k].field) != getattr(old, _BY_KEY[k].field)
    ]
    return msgspec.structs.replace(new, **fields), differ


# ---------------------------------------------------------------------- showing


def render(loaded: Loaded) -> str:
    """The effective configuration as a TOML file (dotted keys) that ``load`` reads back as
    the same configuration, each value's source beside it. Relative paths are written
    absolute (the file may be read from elsewhere); the built-in demo model, which is what
    no model at all means, is a comment."""
    import tomlkit  # here, not at import: every CLI command imports this module

    where = "found" if loaded.file_found else "not found"
    lines = [f"# file: {loaded.path} ({where}; {loaded.path_from})"]
    config = loaded.config
    for s in SETTINGS:
        value = getattr(config, s.field)
        source = loaded.sources[s.key]
        if value is None:
            lines.append(f"# {s.key} is not set  # {source}")
            continue
        if s.path:
            value = _absolute(value)
        lines.append(f"{s.key} = {tomlkit.item(value).as_string()}  # {source}")
    for name, directory in config.models.items():
        source = loaded.sources[f"models.{name}"]
        if Path(directory).expanduser().is_dir():  # a folder, not a name for the hub
            directory = _absolute(directory)
        line = f"models.{tomlkit.key(name).as_string()} = {tomlkit.item(directory).as_string()}"
        if source == "default":
            lines.append(f"# {line}  # default: the built-in demo model, with no model set")
        else:
            lines.append(f"{line}  # {source}")
    lines += model_options.lines(config.model_options, loaded.sources)
    return "\n".join(lines)


def _absolute(value: str) -> str:
    p = Path(value).expanduser()
    return value if p.is_absolute() else str(p.absolute())


def as_json(loaded: Loaded) -> dict[str, Any]:
    config = loaded.config
    settings = {
        s.key: {"value": getattr(config, s.field), "source": loaded.sources[s.key]}
        for s in SETTINGS
    }
    for name, directory in config.models.items():
        settings[f"models.{name}"] = {
            "value": directory,
            "source": loaded.sources[f"models.{name}"],
        }
    settings.update(model_options.as_json(config.model_options, loaded.sources))
    return {
        "file": str(loaded.path),
        "file_found": loaded.file_found,
        "file_from": loaded.path_from,
        "settings": settings,
    }
