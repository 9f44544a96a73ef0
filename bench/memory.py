"""Memory and lanes: a long mixed run under a tight budget, and interactive time to first
token with and without background load, side by side in one run.

Two models ("demo": 4 layers x 256, and "small": 4 layers x 128; random weights, built
locally) share one daemon whose memory budget is tight: both models' weights plus room for
only part of what the prompt cache would like to keep, so entries are evicted to make room
as the run goes. Workloads, all greedy, through mlxd's Unix socket:

- interactive: 4 clients, each a 3-turn chat (next turn = history + the reply as received)
  and editor-style completions (a file prefix growing by a line), alternating models;
  time to first token (TTFT) measured on the client's side;
- background: 6 clients sending bulk "summarize" requests (~300-token prompts, 96 tokens
  out) for as long as the interactive work runs.

Three phases, each the same interactive work: alone; beside background work marked
``priority: background`` (lanes); beside the same background work left ``interactive``
(no lanes: what a server without lanes does). The tables give, per phase, interactive
TTFT p50/p99 and the share of interactive requests that reused cached tokens; over the
whole run, the cache's hits by kind of lookup and by kind of request (with why the rest
of each prompt missed); and the peak memory (the daemon's accounting and MLX's own
measure) against the budget.

    python bench/memory.py [--rounds 2]

Prints a table and writes bench/results/memory.json. Takes a few minutes on 2 x86 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from servers import revision, stop, wait_mlxd

INTERACTIVE_CLIENTS = 4
BACKGROUND_CLIENTS = 6
CHAT_TOKENS = 24
EDIT_TOKENS = 16
BULK_TOKENS = 96


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def timed(client: Any, **request: Any) -> tuple[float, Any]:
    """TTFT (client side) and the finished request's done message."""
    stream = client.stream(**request)
    sent = time.perf_counter()
    first = None
    parts = []
    async for chunk in stream:
        if first is None and chunk.tokens:
            first = time.perf_counter() - sent
        parts.append(chunk.text)
    assert first is not None and stream.done is not None
    return first, ("".join(parts), stream.done)


Record = dict[str, Any]
"""One request as the client saw it: kind, TTFT, and its done message's cache figures."""


def record(kind: str, ttft: float, done: Any) -> Record:
    return {
        "kind": kind,
        "ttft_s": ttft,
        "prompt_tokens": done.usage.prompt_tokens,
        "cached_tokens": done.usage.cached_tokens,
        "lookup": done.cache.kind if done.cache else "bypass",
        "miss_reason": done.cache.miss_reason if done.cache else None,
    }


async def interactive_client(sock: Path, index: int, rounds: int) -> list[Record]:
    from mlxd.client import AsyncClient

    records: list[Record] = []
    async with AsyncClient(sock, name=f"interactive-{index}") as client:
        for r in range(rounds):
            model = ["demo", "small"][(index + r) % 2]
            messages = [{"role": "system", "content": "You are terse."}]
            for turn in range(3):
                messages.append({"role": "user", "content": f"Client {index}, question {turn}?"})
                ttft, (text, done) = await timed(
                    client, messages=messages, model=model, max_tokens=CHAT_TOKENS
                )
                records.append(record("chat" if turn == 0 else "chat, next turn", ttft, done))
                messages.append({"role": "assistant", "content": text})
            source = f"# module {index}.{r}\nimport os\n"
            for line in range(3):
                source += f"def helper_{line}(path):\n    return os.path.basename(path)\n"
                ttft, (_, done) = await timed(
                    client, prompt=source, model=model, max_tokens=EDIT_TOKENS
                )
                kind = "completion" if line == 0 else "completion, grown"
                records.append(record(kind, ttft, done))
    return records


async def background_client(
    sock: Path, index: int, priority: str, stop_at: asyncio.Event
) -> list[Record]:
    from mlxd.client import AsyncClient

    records: list[Record] = []
    async with AsyncClient(sock, name=f"background-{index}") as client:
        while not stop_at.is_set():
            body = " ".join(f"record {index}-{len(records)}-{i} shipped late." for i in range(50))
            ttft, (_, done) = await timed(
                client,
                prompt=f"Summarize: {body}\nSummary:",
                model="small" if index % 2 else "demo",
                max_tokens=BULK_TOKENS,
                priority=priority,
            )
            records.append(record("background", ttft, done))
    return records


async def phase(sock: Path, rounds: int, background: str | None) -> dict[str, Any]:
    stop_at = asyncio.Event()
    bulk = []
    if background is not None:
        bulk = [
            asyncio.create_task(background_client(sock, i, background, stop_at))
            for i in range(BACKGROUND_CLIENTS)
        ]
        await asyncio.sleep(1.0)  # let the background work fill the batches first
    results = await asyncio.gather(
        *(interactive_client(sock, i, rounds) for i in range(INTERACTIVE_CLIENTS))
    )
    stop_at.set()
    bulk_records = [r for records in await asyncio.gather(*bulk) for r in records]
    interactive = [r for records in results for r in records]
    ttfts = [r["ttft_s"] for r in interactive]
    return {
        "background": background,
        "requests": len(ttfts),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "background_requests_done": len(bulk_records),
        "interactive_hit_rate": sum(r["cached_tokens"] > 0 for r in interactive) / len(interactive),
        "interactive_tokens_cached": sum(r["cached_tokens"] for r in interactive)
        / sum(r["prompt_tokens"] for r in interactive),
        "records": interactive + bulk_records,
    }


def by_kind(records: list[Record]) -> dict[str, dict[str, Any]]:
    """Per kind of request: how many, how many reused cached tokens, the share of prompt
    tokens served from the cache, and why the others missed."""
    kinds: dict[str, dict[str, Any]] = {}
    for r in records:
        k = kinds.setdefault(
            r["kind"], {"requests": 0, "hits": 0, "prompt_tokens": 0, "cached_tokens": 0,
                        "miss_reasons": {}},
        )  # fmt: skip
        k["requests"] += 1
        k["hits"] += r["cached_tokens"] > 0
        k["prompt_tokens"] += r["prompt_tokens"]
        k["cached_tokens"] += r["cached_tokens"]
        if r["miss_reason"]:
            reason = re.sub(r"\d+", "N", r["miss_reason"])  # one bucket for every position
            k["miss_reasons"][reason] = k["miss_reasons"].get(reason, 0) + 1
    for k in kinds.values():
        k["hit_rate"] = k["hits"] / k["requests"]
        k["tokens_cached_share"] = k["cached_tokens"] / k["prompt_tokens"]
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per interactive client")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args()
    began = time.perf_counter()
    measured = revision()

    from mlx.utils import tree_flatten
    from mlx_lm import load

    from mlxd.client import Client
    from mlxd.daemon.demo_model import build_demo_model

    work = Path(tempfile.mkdtemp(prefix="mlxd-bench-memory-", dir="/tmp"))
    dirs = {n: build_demo_model(work / n, size=n) for n in ("demo", "small")}
    weights = {}
    for name, d in dirs.items():
        model, _ = load(str(d))
        weights[name] = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        del model
    # Tight: both models' weights plus 16 MiB for live KV, its transient buffers (a
    # background prompt's prefill alone sets aside about 5 MiB) and cached KV, above the
    # headroom.
    headroom = 0.1
    budget = int((sum(weights.values()) + 16 * 2**20) / (1 - headroom))
    sock = work / "mlxd.sock"
    cmd = [
        sys.executable, "-m", "mlxd.daemon", "serve", "--socket", str(sock),
        "--model", f"demo={dirs['demo']}", "--model", f"small={dirs['small']}",
        "--memory-budget", str(budget), "--memory-headroom", str(headroom),
        "--state-dir", str(work / "state"), "--no-cache-persist", "--log-level", "warning",
    ]  # fmt: skip
    daemon = subprocess.Popen(cmd)
    phases = {}
    try:
        wait_mlxd(sock, daemon)
        with Client(sock) as c:
            for name in dirs:
                c.load(name)
            c.stats(reset_peak=True)
            before = c.stats()
        for name, background in (
            ("alone", None),
            ("with background, lanes", "background"),
            ("with background, no lanes", "interactive"),
        ):
            print(f"phase: {name} ...", flush=True)
            phases[name] = asyncio.run(phase(sock, args.rounds, background))
        with Client(sock) as c:
            after = c.stats()
    finally:
        stop(daemon)
    shutil.rmtree(work, ignore_errors=True)

    records = [r for p in phases.values() for r in p.pop("records")]
    hits = {k: after.cache.hits[k] - before.cache.hits.get(k, 0) for k in after.cache.hits}
    lookups = sum(hits.values())
    reused = after.cache.tokens_reused - before.cache.tokens_reused
    processed = after.cache.tokens_processed - before.cache.tokens_processed
    mem = after.memory
    result = {
        "benchmark": "memory",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlxd_revision": measured,
        "weights_bytes": weights,
        "budget_bytes": budget,
        "headroom": headroom,
        "phases": phases,
        "cache_hits": hits,
        "cache_by_request_kind": by_kind(records),
        "cache_hit_rate": (lookups - hits.get("miss", 0)) / lookups if lookups else 0.0,
        "prompt_tokens_reused": reused,
        "prompt_tokens_processed": processed,
        "memory": {
            "peak_used_bytes": mem.peak_used_bytes,
            "mlx_peak_bytes": mem.mlx_peak_bytes,
            "evicted_entries": mem.evicted_entries,
            "unloaded_models": mem.unloaded_models,
            "cache_evictions": after.cache.evictions - before.cache.evictions,
        },
        "run_s": time.perf_counter() - began,
    }
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def print_table(r: dict[str, Any]) -> None:
    mib = 2**20
    print(
        f"\nmemory: models demo {r['weights_bytes']['demo'] / mib:.1f} MiB + small "
        f"{r['weights_bytes']['small'] / mib:.1f} MiB; budget {r['budget_bytes'] / mib:.1f} MiB "
        f"({r['headroom']:.0%} headroom); {r['cpus']} CPUs"
    )
    print(
        f"\n{'interactive TTFT':<30}{'requests':>10}{'p50':>12}{'p99':>12}{'bulk done':>11}"
        f"{'cache hits':>12}{'tokens cached':>15}"
    )
    alone = r["phases"]["alone"]
    for name, p in r["phases"].items():
        print(
            f"{name:<30}{p['requests']:>10}{p['ttft_p50_s'] * 1000:>10.1f}ms"
            f"{p['ttft_p99_s'] * 1000:>10.1f}ms{p['background_requests_done']:>11}"
            f"{p['interactive_hit_rate']:>12.0%}{p['interactive_tokens_cached']:>15.0%}"
            + (
                f"   p50 {p['ttft_p50_s'] / alone['ttft_p50_s']:.2f}x alone"
                if p is not alone
                else ""
            )
        )
    hits = r["cache_hits"]
    print(
        "\nprompt cache lookups: "
        + ", ".join(f"{k} {v}" for k, v in hits.items())
        + f"; hit rate {r['cache_hit_rate']:.0%}; prompt tokens reused "
        f"{r['prompt_tokens_reused']} vs computed {r['prompt_tokens_processed']}"
    )
    print(
        f"\n{'by request kind':<20}{'requests':>10}{'hit rate':>10}{'tokens cached':>15}  "
        "why (the rest of) a prompt missed"
    )
    for kind, k in sorted(r["cache_by_request_kind"].items()):
        reasons = ", ".join(f"{n} {c}" for n, c in sorted(k["miss_reasons"].items()))
        print(
            f"{kind:<20}{k['requests']:>10}{k['hit_rate']:>10.0%}"
            f"{k['tokens_cached_share']:>15.0%}  {reasons}"
        )
    m = r["memory"]
    print(
        f"peak memory: accounted {m['peak_used_bytes'] / mib:.2f} MiB, MLX "
        f"{m['mlx_peak_bytes'] / mib:.2f} MiB, budget {r['budget_bytes'] / mib:.2f} MiB "
        f"({'under' if m['mlx_peak_bytes'] <= r['budget_bytes'] else 'OVER'}); "
        f"freed for room: {m['evicted_entries']} cache entries, {m['unloaded_models']} models; "
        f"cache evictions {m['cache_evictions']}"
    )
    print(f"whole run {r['run_s']:.0f} s")


if __name__ == "__main__":
    main()
