"""The ``mlxd`` command: ``serve`` runs the daemon; the other commands are clients of it.

Client commands import only ``mlxd.client`` (no MLX), so they start fast. Errors print one
line on stderr: ``mlxd: error: CODE: message``, exit 1, or 78 for a configuration that cannot
work; a command line argparse refuses, ``mlxd CMD: error: message``, exit 2.

Threading: the main thread only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from mlxd.protocol.paths import default_socket_path, socket_path_problem

from .cli_args import (
    EXIT_CONFIG,
    CommandError,
    Parser,
    know_parsers,
    sampling_args,
    sampling_options,
    size_arg,
    version,
)
from .cli_serve import SOCKET_SETTINGS, serve
from .settings import LOG_LEVELS


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep:
        path, name = text, Path(text).expanduser().name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR or DIR, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mlxd", description="Local LLM inference daemon on MLX")
    parser.add_argument("--version", action="version", version=f"mlxd {version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--socket", help=f"socket path (default {default_socket_path()})")
        return sub

    serve = command("serve", "run the daemon in the foreground until SIGTERM or SIGINT")
    serve.add_argument(
        "--config", help="the configuration file (default: $MLXD_CONFIG, else the user's)"
    )
    serve.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        default=[],
        metavar="NAME=DIR|REPO",
        help="serve the mlx-lm model directory DIR, or the Hugging Face repo REPO (org/name), "
        "as NAME (repeatable); none: the demo model",
    )
    serve.add_argument("--models-dir", help="a folder whose sub-folders are models, by folder name")
    serve.add_argument("--default-model", help="the model for requests that name none")
    serve.add_argument("--memory-budget", type=size_arg, help="weights + KV bytes, e.g. 8G")
    serve.add_argument("--keep-alive", type=float, help="idle seconds before unloading; -1 never")
    serve.add_argument("--max-frame-bytes", type=size_arg, help="largest frame accepted (4M)")
    serve.add_argument("--max-tokens-limit", type=int, help="largest max_tokens allowed (32768)")
    serve.add_argument(
        "--max-prompt-tokens", type=int, help="prompt tokens allowed (default: model context)"
    )
    serve.add_argument("--max-batch-size", type=int, help="sequences per model decoded together")
    serve.add_argument("--max-queued", type=int, help="waiting requests before overloaded")
    serve.add_argument("--prefill-batch-size", type=int, help="prompts prefilled together")
    serve.add_argument("--prefill-step-size", type=int, help="prompt tokens per prefill step")
    serve.add_argument("--cache-max-bytes", type=size_arg, help="prompt cache budget; 0 disables")
    serve.add_argument("--cache-max-entries", type=int)
    serve.add_argument("--cache-kv-bits", type=int, help="store cache entries quantized (4, 8)")
    serve.add_argument("--cache-kv-group-size", type=int, help="their quantization group")
    serve.add_argument(
        "--no-cache-persist",
        dest="cache_persist",
        action="store_false",
        default=None,
        help="do not save the prompt cache on shutdown nor restore it",
    )
    serve.add_argument("--cache-persist-max-bytes", type=size_arg, help="bytes saved at most")
    serve.add_argument("--max-connections", type=int)
    serve.add_argument(
        "--handshake-timeout", type=float, help="seconds a connection has to say hello (5)"
    )
    serve.add_argument("--max-requests-per-connection", type=int)
    serve.add_argument("--state-dir", help="where the prompt cache is saved")
    serve.add_argument(
        "--allow-root", action="store_true", default=None, help="accept root's connections too"
    )
    serve.add_argument(
        "--distributed",
        action="store_true",
        default=None,
        help="one model across the ranks of mlx.launch (rank 0 serves; see the README)",
    )
    serve.add_argument("--http", help="serve the OpenAI and Ollama HTTP APIs: HOST:PORT, unix:PATH")
    serve.add_argument("--api-key-file", help="a 0600 file with the HTTP API's bearer key")
    serve.add_argument(
        "--memory-headroom", type=float, help="budget fraction kept for MLX's temporaries (0.1)"
    )
    serve.add_argument(
        "--pin-model", action="append", help="keep this model resident once loaded (repeatable)"
    )
    serve.add_argument(
        "--background-aging",
        type=float,
        help="seconds until background work counts as interactive",
    )
    serve.add_argument(
        "--shutdown-grace", type=float, help="seconds in-flight requests get on SIGTERM"
    )
    serve.add_argument(
        "--stall-timeout", type=float, help="seconds one worker round may take before exit 1"
    )
    serve.add_argument(
        "--blas",
        choices=["auto", "system", "bundled"],
        help="Linux: preload the system's OpenBLAS when MLX links the reference BLAS (auto, "
        "the default), always (system), or never (bundled)",
    )
    serve.add_argument(
        "--log-level", type=str.lower, choices=LOG_LEVELS, help="info is the default"
    )
    serve.add_argument("--log-format", choices=["auto", "json", "console"])

    config = commands.add_parser("config", help="the daemon's configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show",
        parents=[serve],  # serve's flags, so a typo in one is refused here as there
        add_help=False,  # serve's -h comes with them
        help="print the effective configuration and where each value came from",
        description="print the effective configuration (defaults < file < MLXD_* < flags) "
        "and where each value came from, as a configuration file serve --config reads; "
        "takes the flags of serve",
    )
    show.add_argument("--json", action="store_true", help="print one JSON object")

    gen = command("generate", "stream a completion to stdout")
    gen.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    sampling_args(gen)
    gen.add_argument(
        "--json", action="store_true", help="print each chunk and the done message as JSON lines"
    )
    gen.add_argument(
        "--verbose", action="store_true", help="then a line of token counts and speed on stderr"
    )

    chat = command("chat", "chat interactively (an empty line or EOF ends it)")
    chat.add_argument("--system", help="a system message")
    sampling_args(chat)

    stats = command("stats", "show daemon statistics")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    from .hub import add_parsers as add_hub_parsers

    add_hub_parsers(commands, command)  # pull, and models (the daemon's and the cache's)

    load = command("load", "load a model and keep it resident")
    load.add_argument("model")
    load.add_argument("--keep-alive", type=float)
    unload = command("unload", "unload a model")
    unload.add_argument("model")
    stop = command("stop", "stop the daemon gracefully (SIGTERM) and wait for it to exit")
    stop.add_argument("--timeout", type=float, default=60.0)
    clear = command("clear-cache", "drop the prompt cache of one model, or of all")
    clear.add_argument("--model")

    demo = commands.add_parser("demo-model", help="build the demo model directory and exit")
    demo.add_argument("--out", required=True, help="the directory to write")
    sizes = ["trained", "demo", "small", "tiny", "bench"]
    demo.add_argument("--size", choices=sizes, default="trained")

    from .service import add_parser as add_service_parser

    add_service_parser(commands)
    know_parsers(parser)
    return parser


def config_command(args: argparse.Namespace) -> int:
    from . import settings

    try:
        loaded = settings.load(vars(args), os.environ, args.config)
    except settings.ConfigError as exc:
        print(f"mlxd: error: invalid_config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(_json(settings.as_json(loaded)) if args.json else settings.render(loaded))
    return 0


def _socket(args: argparse.Namespace) -> Path | None:
    """The daemon's socket for a client command: --socket, $MLXD_SOCKET, the configuration
    file's ``socket``, else (None) the platform's default."""
    from .settings import configured_socket

    if args.socket:
        return Path(args.socket).expanduser()
    return None if os.environ.get("MLXD_SOCKET") else configured_socket()


def _client(args: argparse.Namespace) -> Any:
    from mlxd.client import Client

    path = _socket(args)
    _check_socket_path(path or default_socket_path())
    return Client(path)


def _check_socket_path(path: Path | str) -> None:
    problem = socket_path_problem(path)
    if problem is not None:
        raise CommandError(
            "invalid_config", f"{problem}: use a shorter {SOCKET_SETTINGS}", EXIT_CONFIG
        )


def _json(obj: Any) -> str:
    return msgspec.json.encode(obj).decode()


def generate(args: argparse.Namespace) -> int:
    from mlxd.client import Chunk

    from .progressbar import LoadProgressBar

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    # A bar on stderr if the model loads first, on a terminal only: stdout is the text.
    with _client(args) as client, LoadProgressBar(final_line=False) as bar:
        for message in client.stream(prompt, on_progress=bar, **sampling_options(args)):
            if args.json:
                print(_json(message), flush=True)
            elif isinstance(message, Chunk):
                sys.stdout.write(message.text)
                sys.stdout.flush()
    if not args.json:
        sys.stdout.write("\n")
    if args.verbose:
        from .cli_output import done_summary

        sys.stdout.flush()  # the text first, on a terminal where both are shown
        print(done_summary(message), file=sys.stderr)
    return 0


def chat(args: argparse.Namespace) -> int:
    from .cli_chat import run_chat

    with _client(args) as client:
        return run_chat(client, args.system, sampling_options(args))


def models(args: argparse.Namespace) -> int:
    from . import hub

    def daemon_models() -> Any:
        with _client(args) as client:
            return client.models()

    return hub.models(args, daemon_models)


def stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.stats()
    if args.json:
        print(_json(result))
        return 0
    from .cli_output import stats_summary

    print(stats_summary(result))
    return 0


def load(args: argparse.Namespace) -> int:
    from .progressbar import LoadProgressBar

    # A bar on stderr while it loads (a terminal), or its final line (a log); nothing if
    # the model was resident already.
    with _client(args) as client, LoadProgressBar() as bar:
        info = client.load(args.model, keep_alive=args.keep_alive, on_progress=bar)
    print(f"{info.name}\tresident {info.bytes / 2**20:.1f} MiB\t{info.path}")
    return 0


def unload(args: argparse.Namespace) -> int:
    # An unknown model is the daemon's unknown_model; whether it was resident, its list says.
    with _client(args) as client:
        resident = any(m.name == args.model and m.resident for m in client.models())
        client.unload(args.model)
    print(f"{args.model}\t{'unloaded' if resident else 'was not loaded'}")
    return 0


def stop(args: argparse.Namespace) -> int:
    import signal
    import time

    from mlxd.client import DaemonUnavailableError

    from .transport import running_pid

    path = _socket(args) or default_socket_path()
    _check_socket_path(path)
    pid = running_pid(path)
    if pid is None:
        raise DaemonUnavailableError("daemon_unavailable", f"no mlxd is running on {path}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while running_pid(path) == pid:
        if time.monotonic() > deadline:
            print(f"mlxd: error: timeout: pid {pid} still running", file=sys.stderr)
            return 1
        time.sleep(0.05)
    return 0


def clear_cache(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.clear_cache(args.model)  # an unknown model is the daemon's unknown_model
    print(f"cleared the prompt cache of {args.model or 'every model'}")
    return 0


def demo_model(args: argparse.Namespace) -> int:
    from .demo_model import build_demo_model, install_trained_model

    try:
        if args.size == "trained":  # the shipped trained model, as `serve` gets it
            print(install_trained_model(args.out))
        else:
            print(build_demo_model(args.out, size=args.size))
    except OSError as exc:  # e.g. --out a folder of other files, or one we may not write
        message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else exc
        raise CommandError("cannot_write", f"--out: {message}") from None
    return 0


def pull(args: argparse.Namespace) -> int:
    from .hub import pull

    return pull(args)


def service(args: argparse.Namespace) -> int:
    from .service import run

    return run(args)


_COMMANDS = {
    "serve": serve,
    "config": config_command,
    "generate": generate,
    "chat": chat,
    "models": models,
    "pull": pull,
    "stats": stats,
    "load": load,
    "unload": unload,
    "clear-cache": clear_cache,
    "stop": stop,
    "demo-model": demo_model,
    "service": service,
}


def main(argv: Sequence[str] | None = None) -> int:
    from mlxd.client import MlxdError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # refused by the (sub)command they were given to, with its usage
        args.parser.unrecognized(extra)
    # Only a command line that is this process's own may re-execute it (serve's BLAS).
    args.own_command_line = argv is None
    try:
        return _COMMANDS[args.command](args)
    except MlxdError as exc:
        print(f"mlxd: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except CommandError as exc:
        print(f"mlxd: error: {exc.code}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
