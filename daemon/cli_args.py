"""The ``mlxd`` command line's parts: argparse with one-line errors, argument types, the
sampling flags that ``generate`` and ``chat`` share, and the errors a command ends with.

A command line argparse refuses ends with one line naming the (sub)command, ``mlxd CMD:
error: message (see mlxd CMD --help)``, and exit 2; a command that cannot do what it was
asked raises ``CommandError``: ``mlxd: error: CODE: message``, exit 1 or 78.

Threading: the main thread only.
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any, NoReturn

from .settings import SIZE_HINT, parse_bytes

EXIT_USAGE = 2
"""A command line argparse refuses, as argparse itself exits."""
EXIT_CONFIG = 78
"""sysexits' EX_CONFIG: a service manager can tell "fix the file" from a crash."""


class CommandError(Exception):
    """A command cannot do what it was asked: one line, ``mlxd: error: CODE: message``."""

    def __init__(self, code: str, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code


class Parser(argparse.ArgumentParser):
    """argparse, with one-line errors naming the (sub)command, and values such as ``-5G``
    taken as values (not as flags), so a size flag can say what is wrong with them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Python 3.13's rule (a dash then a digit), on every version: `-5G` is a value.
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unrecognized(self, extra: list[str]) -> NoReturn:
        """Arguments this (sub)command does not take; a near miss is suggested."""
        options = [o for a in self._actions for o in a.option_strings]
        hints = [
            f"{arg} (did you mean {close[0]}?)" if close else arg
            for arg in extra
            for close in [difflib.get_close_matches(arg.partition("=")[0], options, n=1)]
        ]
        self.error(f"unrecognized arguments: {' '.join(hints)}")


def size_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size ({SIZE_HINT})") from None


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlxd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def know_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser as its namespace's ``parser``: whose usage an error gets."""
    parser.set_defaults(parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                know_parsers(sub)


def sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name (default: the daemon's default)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")
    parser.add_argument(
        "--speculative",
        choices=["off", "prompt_lookup", "draft"],
        help="speculative decoding (default: the model's configured mode, else off)",
    )


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
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
        "speculative",
    )
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}
