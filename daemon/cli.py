"""The ``mlxd`` command: ``serve`` runs the daemon; the other commands are clients of it.

Client commands import only ``mlxd.client`` (no MLX), so they start fast. Errors print one
line, ``mlxd: error: CODE: message``, on stderr and exit non-zero.

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

from mlxd.protocol.paths import default_socket_path

from .config import DEMO_MODEL_NAME, Config

_SIZE_SUFFIXES = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _bytes(text: str) -> int:
    """``8G``, ``512M`` or a plain byte count."""
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    if text and text[-1] in _SIZE_SUFFIXES:
        return int(float(text[:-1]) * _SIZE_SUFFIXES[text[-1]])
    return int(text)


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep:
        path, name = text, Path(text).expanduser().name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR or DIR, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxd", description="Local LLM inference daemon on MLX")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--socket", help=f"socket path (default {default_socket_path()})")
        return sub

    serve = command("serve", "run the daemon in the foreground until SIGTERM or SIGINT")
    serve.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        default=[],
        metavar="NAME=DIR",
        help="serve the mlx-lm model directory DIR as NAME (repeatable); none: the demo model",
    )
    serve.add_argument("--models-dir", help="a folder whose sub-folders are models, by folder name")
    serve.add_argument("--default-model", help="the model for requests that name none")
    serve.add_argument("--memory-budget", type=_bytes, help="bytes for resident weights, e.g. 8G")
    serve.add_argument("--keep-alive", type=float, help="idle seconds before unloading; -1 never")
    serve.add_argument("--max-frame-bytes", type=_bytes, help="largest frame accepted (4M)")
    serve.add_argument("--max-tokens-limit", type=int, help="largest max_tokens allowed (32768)")
    serve.add_argument(
        "--max-prompt-tokens", type=int, help="prompt tokens allowed (default: model context)"
    )
    serve.add_argument(
        "--max-requests-per-connection", type=int, help="requests in flight per connection (64)"
    )
    serve.add_argument("--max-connections", type=int, help="connections at once (256)")
    serve.add_argument("--max-batch-size", type=int, help="sequences per model decoded together")
    serve.add_argument("--max-queued", type=int, help="waiting requests before overloaded")
    serve.add_argument("--prefill-batch-size", type=int, help="prompts prefilled together")
    serve.add_argument("--prefill-step-size", type=int, help="prompt tokens per prefill step")
    serve.add_argument("--cache-max-bytes", type=_bytes, help="prompt cache budget; 0 disables")
    serve.add_argument("--cache-max-entries", type=int)
    serve.add_argument(
        "--no-cache-persist",
        dest="cache_persist",
        action="store_false",
        help="do not save the prompt cache on shutdown nor restore it",
    )
    serve.add_argument("--state-dir", help="where the prompt cache is saved")
    serve.add_argument("--allow-root", action="store_true", help="accept root's connections too")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")

    gen = command("generate", "stream a completion to stdout")
    gen.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    _sampling_args(gen)
    gen.add_argument(
        "--json", action="store_true", help="print each chunk and the done message as JSON lines"
    )

    chat = command("chat", "chat interactively (an empty line or EOF ends it)")
    chat.add_argument("--system", help="a system message")
    _sampling_args(chat)

    for name, help in (("models", "list models"), ("stats", "show daemon statistics")):
        sub = command(name, help)
        sub.add_argument("--json", action="store_true", help="print one JSON object")

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
    demo.add_argument("--size", choices=["demo", "small", "tiny", "bench"], default="demo")
    return parser


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name (default: the daemon's default)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "seed",
        "stop",
    )
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def serve(args: argparse.Namespace) -> int:
    from . import logs

    fields: dict[str, Any] = {"log_level": args.log_level, "log_format": args.log_format}
    if args.socket:
        fields["socket_path"] = args.socket
    models = dict(args.model)
    if not models and not args.models_dir:
        from .demo_model import default_demo_model_dir

        demo_dir = str(default_demo_model_dir())
        models = {DEMO_MODEL_NAME: demo_dir}
        fields["demo_model_dir"] = demo_dir
    fields["models"] = models
    for name in ("models_dir", "default_model"):
        if getattr(args, name):
            fields[name] = getattr(args, name)
    if args.memory_budget is not None:
        fields["memory_budget_bytes"] = args.memory_budget
    if args.keep_alive is not None:
        fields["keep_alive_s"] = args.keep_alive
    for name in (
        "max_frame_bytes",
        "max_tokens_limit",
        "max_prompt_tokens",
        "max_requests_per_connection",
        "max_connections",
        "max_batch_size",
        "max_queued",
        "prefill_batch_size",
        "prefill_step_size",
        "cache_max_bytes",
        "cache_max_entries",
        "state_dir",
    ):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    fields["cache_persist"] = args.cache_persist
    fields["allow_root"] = args.allow_root
    config = Config(**fields)
    logs.setup(config.log_level, config.log_format)
    code = run_server(config)
    # Everything is closed and flushed by now. Leave without running C++ static destructors:
    # MLX's stream threads can still be winding down from the worker thread's exit, and
    # destroying them then aborts the process ("terminate called without an active
    # exception"), turning a clean exit into a crash report.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_server(config: Config) -> int:
    import asyncio

    from .server import Server
    from .transport import AlreadyRunning

    try:
        import uvloop
    except ImportError:  # e.g. a platform without uvloop wheels: plain asyncio serves too
        uvloop = None
    server = Server(config)
    try:
        if uvloop is not None:
            return uvloop.run(server.serve())
        return asyncio.run(server.serve())
    except AlreadyRunning as exc:
        print(f"mlxd: error: already_running: {exc}", file=sys.stderr)
        return 1


def _client(args: argparse.Namespace) -> Any:
    from mlxd.client import Client

    return Client(args.socket)


def _json(obj: Any) -> str:
    return msgspec.json.encode(obj).decode()


def generate(args: argparse.Namespace) -> int:
    from mlxd.client import Chunk

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with _client(args) as client:
        for message in client.stream(prompt, **_sampling_options(args)):
            if args.json:
                print(_json(message), flush=True)
            elif isinstance(message, Chunk):
                sys.stdout.write(message.text)
                sys.stdout.flush()
    if not args.json:
        sys.stdout.write("\n")
    return 0


def chat(args: argparse.Namespace) -> int:
    from mlxd.client import Chunk

    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    with _client(args) as client:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                return 0
            history.append({"role": "user", "content": line.rstrip("\n")})
            reply = []
            for message in client.stream(messages=history, **_sampling_options(args)):
                if isinstance(message, Chunk):
                    reply.append(message.text)
                    sys.stdout.write(message.text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": "".join(reply)})


def models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = client.models()
    if args.json:
        print(_json({"models": infos}))
        return 0
    for m in infos:
        state = f"resident {m.bytes / 2**20:.1f} MiB" if m.resident else "not loaded"
        print(f"{m.name}\t{state}\t{m.path}")
    return 0


def stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.stats()
    if args.json:
        print(_json(result))
        return 0
    for name, value in msgspec.structs.asdict(result).items():
        print(f"{name}\t{value}")
    return 0


def load(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.load(args.model, keep_alive=args.keep_alive)
    print(f"{info.name}\tresident {info.bytes / 2**20:.1f} MiB\t{info.path}")
    return 0


def unload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.unload(args.model)
    return 0


def stop(args: argparse.Namespace) -> int:
    import signal
    import time

    from mlxd.client import DaemonUnavailableError

    from .transport import running_pid

    path = Path(args.socket).expanduser() if args.socket else default_socket_path()
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
        client.clear_cache(args.model)
    return 0


def demo_model(args: argparse.Namespace) -> int:
    from .demo_model import build_demo_model

    print(build_demo_model(args.out, size=args.size))
    return 0


_COMMANDS = {
    "serve": serve,
    "generate": generate,
    "chat": chat,
    "models": models,
    "stats": stats,
    "load": load,
    "unload": unload,
    "clear-cache": clear_cache,
    "stop": stop,
    "demo-model": demo_model,
}


def main(argv: Sequence[str] | None = None) -> int:
    from mlxd.client import MlxdError

    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except MlxdError as exc:
        print(f"mlxd: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
