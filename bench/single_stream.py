"""Single-stream decode speed: mlxd over its Unix socket vs mlx-lm's in-process
``stream_generate`` (the limit) and mlx-lm's own server (``mlx_lm server``, streamed
``/v1/completions`` over loopback HTTP), on the same model, side by side in one run.

Each trial runs all three, one after the other, and the table reports medians and the
ratios to in-process (these machines are noisy: ratios, not absolute times, are what to
compare). Decode tokens/s is measured from the first generated token to the last, on the
client's side for the servers, so it includes the socket, framing and the event loop.

    python bench/single_stream.py [--sizes tiny demo] [--tokens 512] [--trials 5]

``--blas reference|openblas|both`` (default both): the BLAS MLX multiplies with, in this
process and in the daemon; ``both`` runs the benchmark once in each, one after the other,
and ends with a table of the two side by side (see bench/blas_regime.py; without OpenBLAS
installed, the reference one alone, and how to install it).

Prints a table per regime and writes bench/results/single_stream.json (``regimes``: each
one's results).
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blas_regime
from servers import free_port, start_mlx_lm, stop, wait_http, wait_mlxd

PROMPT = "def quicksort(items):"
TARGET = 0.97  # mlxd / in-process single-stream decode, at least (issue 16)


def in_process(model_dir: Path, tokens: int) -> tuple[float, int]:
    from mlx_lm import load, stream_generate

    model, tokenizer = _cached_load(model_dir, load)
    first = last = 0.0
    n = 0
    for _ in stream_generate(model, tokenizer, PROMPT, max_tokens=tokens):
        now = time.perf_counter()
        if n == 0:
            first = now
        last = now
        n += 1
    return (n - 1) / (last - first), n


_loaded: dict[Path, tuple[object, object]] = {}


def _cached_load(model_dir: Path, load):  # type: ignore[no-untyped-def]
    if model_dir not in _loaded:
        _loaded[model_dir] = load(str(model_dir))
    return _loaded[model_dir]


def through_daemon(socket: Path, model: str, tokens: int) -> tuple[float, int]:
    from mlxd.client import Chunk, Client

    first = last = 0.0
    n = 0
    with Client(socket) as client:
        for m in client.stream(PROMPT, model=model, max_tokens=tokens):
            now = time.perf_counter()
            if isinstance(m, Chunk):
                if n == 0:
                    first = now
                last = now
                n += len(m.tokens)
    return (n - 1) / (last - first), n


def through_mlx_lm(port: int, tokens: int) -> tuple[float, int]:
    """One streamed completion from mlx-lm's server: its server-sent events, timed as they
    are read; the token count is the server's own (``usage``)."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    first = last = 0.0
    n = 0
    while line := response.readline():
        if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
            continue
        event = json.loads(line[5:])
        if event.get("usage"):
            n = event["usage"]["completion_tokens"]
        if any(c.get("text") for c in event.get("choices") or []):
            now = time.perf_counter()
            first = first or now
            last = now
    conn.close()
    return (n - 1) / (last - first), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "single_stream.json")
    )
    blas_regime.add_argument(parser)
    args = parser.parse_args()
    regime = blas_regime.child_regime()
    if regime is None:  # this process runs each regime's run, then the side by side
        blas_regime.run_regimes(args.blas, Path(args.out), "single_stream", figures)
        return

    from mlxd.daemon.demo_model import build_demo_model

    work = Path(tempfile.mkdtemp(prefix="mlxd-bench-", dir="/tmp"))
    models = {size: build_demo_model(work / size, size=size) for size in args.sizes}
    socket = work / "mlxd.sock"
    cmd = [
        sys.executable,
        "-m",
        "mlxd.daemon",
        "serve",
        "--socket",
        str(socket),
        "--log-level",
        "warning",
        "--blas",
        "bundled",  # the in-process side's BLAS (this process's), never one of its own
    ]
    for size, path in models.items():
        cmd += ["--model", f"{size}={path}"]
    daemon = subprocess.Popen(cmd)
    server = None
    try:
        wait_mlxd(socket, daemon)
        blas_regime.check_process(daemon.pid, regime, "mlxd")
        rows = []
        for size, path in models.items():
            port = free_port()
            server = start_mlx_lm(work, path, port)  # one model per mlx_lm server
            wait_http(port, server)
            blas_regime.check_process(server.pid, regime, "mlx_lm server")
            through_daemon(socket, size, 32)  # warm up every side
            through_mlx_lm(port, 32)
            in_process(path, 32)
            mine, theirs, server_tps = [], [], []
            for _ in range(args.trials):
                tps, n_in = in_process(path, args.tokens)
                theirs.append(tps)
                tps, n_d = through_daemon(socket, size, args.tokens)
                mine.append(tps)
                tps, n_s = through_mlx_lm(port, args.tokens)
                server_tps.append(tps)
                # mlx-lm counts a final end-of-sequence token, the daemon does not send it.
                assert abs(n_in - n_d) <= 1, f"token counts differ: {n_in} vs {n_d}"
                assert abs(n_in - n_s) <= 1, f"token counts differ: {n_in} vs {n_s} (mlx_lm)"
            stop(server)
            server = None
            rows.append(
                {
                    "model": size,
                    "tokens": n_d,
                    "in_process_tps": statistics.median(theirs),
                    "daemon_tps": statistics.median(mine),
                    "mlx_lm_server_tps": statistics.median(server_tps),
                    "ratio": statistics.median(mine) / statistics.median(theirs),
                    "mlx_lm_server_ratio": statistics.median(server_tps)
                    / statistics.median(theirs),
                    "trials_in_process": theirs,
                    "trials_daemon": mine,
                    "trials_mlx_lm_server": server_tps,
                }
            )
    finally:
        daemon.terminate()
        daemon.wait(30)
        stop(server)

    print(
        f"\nsingle-stream decode, median of {args.trials} trials, greedy, {args.tokens} tokens, "
        f"BLAS: {regime}"
    )
    print(
        f"{'model':<8}{'tokens':>8}{'in-process tok/s':>20}{'mlxd tok/s':>14}{'ratio':>9}"
        f"{'mlx_lm server':>16}{'ratio':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:<8}{r['tokens']:>8}{r['in_process_tps']:>20.1f}"
            f"{r['daemon_tps']:>14.1f}{r['ratio']:>8.3f}x"
            f"{r['mlx_lm_server_tps']:>16.1f}{r['mlx_lm_server_ratio']:>8.3f}x"
        )
    target = min(r["ratio"] for r in rows)
    verdict = "PASS" if target >= TARGET else "MISS"
    print(
        f"\ntarget (issue 16): mlxd >= {TARGET}x in-process on every model: {target:.3f}x {verdict}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "blas": regime,
    }
    out.write_text(json.dumps({"benchmark": "single_stream", **meta, "results": rows}, indent=2))
    print(f"\nwrote {out}")


def figures(result: dict) -> list[blas_regime.Figure]:
    """The rows of the regimes' side-by-side table."""
    rows: list[blas_regime.Figure] = []
    for r in result["results"]:
        rows.append((f"{r['model']}: mlx-lm in-process tok/s", r["in_process_tps"]))
        rows.append((f"{r['model']}: mlxd tok/s", r["daemon_tps"]))
        rows.append((f"{r['model']}: mlx_lm server tok/s", r["mlx_lm_server_tps"]))
        rows.append((f"{r['model']}: mlxd / in-process", r["ratio"]))
        rows.append((f"{r['model']}: mlx_lm server / in-process", r["mlx_lm_server_ratio"]))
    return rows


if __name__ == "__main__":
    main()
