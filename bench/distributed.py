"""Distributed mode's cost on one machine: mlxd on 1 rank (plain ``serve``) against 2 ranks
(``serve --distributed``, the ring backend over loopback, started as ``mlx.launch`` starts
them), on the same model, side by side in one run.

Two ranks on one machine are expected to be slower: they share its cores, and every
layer's forward pass ends in a collective over loopback. The table shows by how much:

- decode tokens/s of one stream, and of 8 at once (aggregate); time to first token of a
  ~300-token prompt; medians of ``--trials``;
- the collective's own cost: ``all_sum`` of a small array between the two ranks
  (microseconds, a separate pair of processes), and times the collectives one decode step
  makes (two per layer, and the round's two);
- the bytes rank 0 broadcasts per round (the ``rounds_shared`` line rank 0 logs at its
  stop: bytes over rounds).

    python bench/distributed.py [--trials 5] [--tokens 128] [--blas reference|openblas|both]

Prints a table per regime and one of them side by side; writes
bench/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import blas_regime
from servers import free_port, stop, wait_mlxd

PROMPT = "def quicksort(items):\n    " * 30
ALLSUM = """
import sys, time, mlx.core as mx
g = mx.distributed.init()
x = mx.ones((64,))
for _ in range(50):
    mx.eval(mx.distributed.all_sum(x, stream=mx.cpu))
t = time.perf_counter()
n = 2000
for _ in range(n):
    mx.eval(mx.distributed.all_sum(x, stream=mx.cpu))
if g.rank() == 0:
    print((time.perf_counter() - t) / n * 1e6)
"""


def _ranks_env(work: Path, rank: int, hosts: Path) -> dict[str, str]:
    return {**os.environ, "MLX_HOSTFILE": str(hosts), "MLX_RANK": str(rank)}


def _hosts(work: Path) -> Path:
    hosts = work / f"hosts-{free_port()}.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    return hosts


def start(work: Path, model: Path, ranks: int) -> tuple[list[subprocess.Popen[bytes]], Path]:
    sock = work / f"mlxd-{ranks}.sock"
    base = [sys.executable, "-m", "mlxd.daemon", "serve", "--socket", str(sock),
            "--model", f"m={model}", "--no-cache-persist", "--log-format", "json",
            "--blas", "bundled"]  # fmt: skip
    if ranks == 1:
        log = open(work / "rank-solo.log", "wb")  # noqa: SIM115
        return [subprocess.Popen(base, stdout=log, stderr=subprocess.STDOUT)], sock
    hosts = _hosts(work)
    procs = []
    for rank in range(ranks):
        log = open(work / f"rank-{rank}.log", "wb")  # noqa: SIM115
        cmd = [*base, "--distributed", "--state-dir", str(work / f"state-{rank}")]
        env = _ranks_env(work, rank, hosts)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs, sock


def decode(client: Any, tokens: int) -> tuple[float, float]:
    """(decode tok/s, time to first token) of one greedy stream of ``PROMPT``."""
    from mlxd.client import Chunk

    began = time.perf_counter()
    first = last = 0.0
    n = 0
    for m in client.stream(PROMPT, max_tokens=tokens, cache=False):
        if isinstance(m, Chunk) and m.tokens:
            now = time.perf_counter()
            first = first or now
            last = now
            n += len(m.tokens)
    return (n - 1) / (last - first), first - began


def concurrent(sock: Path, tokens: int, n: int = 8) -> float:
    from mlxd.client import Client

    counts: list[int] = []
    began = time.perf_counter()

    def run(i: int) -> None:
        with Client(sock) as c:
            counts.append(len(c.generate(f"{PROMPT} # {i}", max_tokens=tokens, cache=False).tokens))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - began)


def allsum_us(work: Path) -> float:
    hosts = _hosts(work)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ALLSUM],
            env=_ranks_env(work, r, hosts),
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    out = procs[0].communicate(120)[0]
    procs[1].wait(120)
    return float(out.strip().splitlines()[-1])


def run(model: Path, work: Path, ranks: int, args: argparse.Namespace) -> dict[str, Any]:
    from mlxd.client import Client

    procs, sock = start(work, model, ranks)
    try:
        wait_mlxd(sock, procs[0])
        with Client(sock) as c:
            decode(c, 16)  # warm up
            runs = [decode(c, args.tokens) for _ in range(args.trials)]
        agg = statistics.median(concurrent(sock, args.tokens // 2) for _ in range(args.trials))
    finally:
        procs[0].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
        for p in procs:
            stop(p)
    row: dict[str, Any] = {
        "ranks": ranks,
        "decode_tps": statistics.median(r[0] for r in runs),
        "ttft_s": statistics.median(r[1] for r in runs),
        "concurrent_8_tps": agg,
    }
    if ranks > 1:
        for line in (work / "rank-0.log").read_text().splitlines():
            if '"rounds_shared"' in line:
                shared = json.loads(line)
                row["bytes_per_round"] = shared["bytes"] / max(1, shared["rounds"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "distributed.json")
    )
    blas_regime.add_argument(parser)
    args = parser.parse_args()
    regime = blas_regime.child_regime()
    if regime is None:
        blas_regime.run_regimes(args.blas, Path(args.out), "distributed", figures)
        return
    from mlxd.daemon.demo_model import SIZES, build_demo_model

    work = Path(tempfile.mkdtemp(prefix="mlxd-bench-dist-", dir="/tmp"))
    work.chmod(0o700)
    model = build_demo_model(work / "small", size="small")
    one, two = run(model, work, 1, args), run(model, work, 2, args)
    micro = allsum_us(work)
    layers = SIZES["small"]["num_hidden_layers"]
    per_step = micro * (2 * layers + 2)
    step_1, step_2 = 1e6 / one["decode_tps"], 1e6 / two["decode_tps"]
    print(
        f"\ndistributed, small model, ring over loopback, BLAS: {regime}, medians of {args.trials}"
    )
    print(f"{'':<40}{'1 rank':>12}{'2 ranks':>12}{'2 / 1':>10}")
    for label, key in (("decode tok/s, one stream", "decode_tps"),
                       ("decode tok/s, 8 at once", "concurrent_8_tps"),
                       ("time to first token, s", "ttft_s")):  # fmt: skip
        print(f"{label:<40}{one[key]:>12.3f}{two[key]:>12.3f}{two[key] / one[key]:>9.2f}x")
    print(f"{'decode step, us':<40}{step_1:>12.0f}{step_2:>12.0f}{step_2 / step_1:>9.2f}x")
    print(f"all_sum of 64 floats over loopback: {micro:.0f} us; x {2 * layers + 2} per decode "
          f"step = {per_step:.0f} us")  # fmt: skip
    print(f"bytes rank 0 broadcasts per round: {two.get('bytes_per_round', 0):.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "distributed",
        "machine": platform.machine(),
        "blas": regime,
        "one_rank": one,
        "two_ranks": two,
        "allsum_us": micro,
        "collectives_per_step": 2 * layers + 2,
        "collective_us_per_step": per_step,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


def figures(result: dict[str, Any]) -> list[blas_regime.Figure]:
    one, two = result["one_rank"], result["two_ranks"]
    return [
        ("1 rank: decode tok/s", one["decode_tps"]),
        ("2 ranks: decode tok/s", two["decode_tps"]),
        ("1 rank: 8 at once tok/s", one["concurrent_8_tps"]),
        ("2 ranks: 8 at once tok/s", two["concurrent_8_tps"]),
        ("1 rank: TTFT s", one["ttft_s"]),
        ("2 ranks: TTFT s", two["ttft_s"]),
        ("all_sum us (loopback)", result["allsum_us"]),
        ("collective us per decode step", result["collective_us_per_step"]),
        ("bytes broadcast per round", two.get("bytes_per_round", 0.0)),
    ]


if __name__ == "__main__":
    main()
