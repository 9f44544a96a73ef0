"""The BLAS regimes a benchmark runs in, one child process each, and their side-by-side table.

On Linux, MLX's CPU wheel multiplies with netlib's reference BLAS, which it bundles;
preloading the system's OpenBLAS makes the same matmuls 10-50x faster. The loader reads
``LD_PRELOAD`` only when a process starts, so a benchmark given ``--blas
reference|openblas|both`` (default ``both``) re-runs itself once per regime, in a child
whose environment sets it: ``LD_PRELOAD`` holds the OpenBLAS (``openblas``) or no BLAS
(``reference``), and ``MLXD_BLAS=bundled``, so that the daemon the child starts, and
mlx_lm's server, run exactly the child's BLAS (mlxd would otherwise choose for itself:
see daemon/blas.py). Each child measures everything of its benchmark (in-process, mlx_lm
server, mlxd) under its regime, checks that its own process and the servers' have the
right library mapped, prints its usual table and writes its JSON; then the parent prints
the key figures side by side and writes one JSON, ``{"benchmark", "blas", "regimes":
{regime: the child's JSON}}``.

Without an installed OpenBLAS (``.ci/run``'s machine may lack it), ``--blas openblas``
exits 2 and ``--blas both`` runs the reference regime alone; both say how to install it.
Off Linux there is one regime, MLX's own (``reference`` stands for it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlxd.daemon import blas

CHOICES = ("reference", "openblas", "both")
CHILD_ENV = "MLXD_BENCH_BLAS"
"""Set in a regime's child: the regime it measures in."""

Figure = tuple[str, float | str]
"""A row of the side-by-side table: its label, its value (the higher the better unless
the label says otherwise), or a verdict in words (``0.97x PASS``), shown as it is."""


def add_argument(parser: Any, default: str = "both") -> None:
    parser.add_argument(
        "--blas",
        choices=CHOICES,
        default=default,
        help="the BLAS MLX multiplies with, in the benchmark and in every server it starts: "
        "reference (the Linux wheel's), openblas (the system's, preloaded) or both, one "
        f"after the other, side by side (default: {default})",
    )


def openblas_or_reference() -> str:
    """``openblas`` where it is installed (Linux), else ``reference``: the default of a
    benchmark whose target is set in the OpenBLAS regime."""
    on_linux = sys.platform.startswith("linux")
    return "openblas" if on_linux and blas.system_blas() is not None else "reference"


def child_regime() -> str | None:
    """The regime this process measures in (checked), or None in the parent."""
    regime = os.environ.get(CHILD_ENV)
    if regime:
        check_process(os.getpid(), regime, "this benchmark")
    return regime or None


def check_process(pid: int, regime: str, what: str) -> None:
    """Exit if process ``pid`` does not have the regime's BLAS mapped (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    paths = blas.mapped_paths(Path(f"/proc/{pid}/maps").read_text())
    # The preloaded library itself: numpy maps an OpenBLAS of its own (libscipy_openblas64_,
    # its symbols prefixed), in every regime.
    library = blas.preloaded_blas(os.environ)
    has = library is not None and blas.is_mapped(library, paths)
    if has != (regime == "openblas"):
        sys.exit(f"{what} (pid {pid}) runs the wrong BLAS for the {regime} regime")


def regimes(requested: str) -> tuple[list[str], str | None]:
    """The regimes to run, and the OpenBLAS library (None where there is none)."""
    library = blas.system_blas() if sys.platform.startswith("linux") else None
    wanted = ["reference", "openblas"] if requested == "both" else [requested]
    if "openblas" in wanted and library is None:
        if sys.platform.startswith("linux"):
            advice = f"no OpenBLAS is installed; to install it: {blas.INSTALL_HINT}"
        else:
            advice = "the OpenBLAS regime is Linux's (MLX uses Accelerate here)"
        if requested == "openblas":
            print(f"--blas openblas: {advice}", file=sys.stderr)
            sys.exit(2)
        print(f"--blas both: running the reference regime only; {advice}", flush=True)
        wanted = ["reference"]
    return wanted, library


def environment(regime: str, library: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != blas.REEXEC_ENV}
    others = [
        e
        for e in re.split(r"[\s:]+", env.pop("LD_PRELOAD", ""))
        if e and not blas.preloaded_blas({"LD_PRELOAD": e})
    ]
    if regime == "openblas" and library:
        others.append(library)
    if others:
        env["LD_PRELOAD"] = ":".join(others)
    env["MLXD_BLAS"] = "bundled"  # the daemon runs the child's BLAS, never one of its own
    env[CHILD_ENV] = regime
    return env


def run_regimes(
    requested: str,
    out: Path,
    benchmark: str,
    figures: Callable[[dict[str, Any]], Sequence[Figure]],
) -> None:
    """In the parent: run this script (``sys.argv``) once per regime, print the
    side-by-side table of ``figures(result)`` and write the combined JSON to ``out``."""
    wanted, library = regimes(requested)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mlxd-bench-blas-") as tmp:
        for regime in wanted:
            print(f"\n=== BLAS regime: {regime} {library if regime == 'openblas' else ''}")
            child_out = Path(tmp) / f"{regime}.json"
            cmd = [sys.executable, *sys.argv, "--blas", regime, "--out", str(child_out)]
            code = subprocess.run(cmd, env=environment(regime, library)).returncode
            if code != 0:
                sys.exit(f"the {regime} regime's run exited {code}")
            results[regime] = json.loads(child_out.read_text())
    print_side_by_side(benchmark, {r: figures(res) for r, res in results.items()})
    combined = {
        "benchmark": benchmark,
        "blas": {r: library if r == "openblas" else "bundled" for r in results},
        "regimes": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(combined, indent=2) + "\n")
    print(f"\nwrote {out}")


def print_side_by_side(benchmark: str, rows: dict[str, Sequence[Figure]]) -> None:
    names = list(rows)
    print(f"\n{benchmark}: the BLAS regimes side by side")
    header = f"{'':<44}" + "".join(f"{n:>12}" for n in names)
    if len(names) == 2:
        header += f"{names[1] + '/' + names[0]:>22}"
    print(header)
    first = rows[names[0]]
    for i, (label, _) in enumerate(first):
        values = [rows[n][i][1] for n in names]
        line = f"{label:<44}" + "".join(_cell(v) for v in values)
        a, b = values[0], values[-1]
        if len(values) == 2 and isinstance(a, float | int) and isinstance(b, float | int) and a:
            line += f"{b / a:>21.2f}x"
        print(line)


def _cell(value: float | str) -> str:
    if isinstance(value, str):
        return f"{value:>12}"
    return f"{value:>12.3f}" if abs(value) < 10 else f"{value:>12.1f}"
