"""Concurrency: mlxd vs mlx-lm's own HTTP server (``mlx_lm server``) under 1, 4 and 16
simultaneous clients, single-stream decode against mlx-lm in-process, an editor's typing
workload, and each server's peak memory, on the same model, side by side in one run.

The model is the "small" demo size (4 layers, 128 wide, random weights, built locally): the
shape issue 4's reference numbers for mlx_lm.server were taken on. Compare ratios, not
absolute figures (these machines are noisy). Contestants:

- in-process: mlx-lm's ``stream_generate`` in this process for the single stream, and its
  ``BatchGenerator`` fed each burst at once for the concurrency rows: no server, socket or
  detokenizer, so the limit any server built on mlx-lm can approach on this machine (with
  the Linux wheel's reference BLAS, below, batched decode is compute-bound: a batch of 16
  costs about 5x a batch of 1, measured);
- mlx_lm server: ``python -m mlx_lm server --model DIR --host 127.0.0.1 --port P`` with its
  defaults (continuous batching, up to 32 decoding) except ``--log-level WARNING``, so that
  neither server spends time logging; streamed OpenAI completions (``POST /v1/completions``)
  over loopback HTTP, read with asyncio streams;
- mlxd: ``python -m mlxd.daemon serve`` over its Unix socket, one ``AsyncClient`` (one
  connection) per simulated client.

Workloads:

1. Single stream: greedy, 256 tokens, decode tokens/s measured on the client's side from
   the first generated token to the last. Each trial runs all three back to back (the
   servers' order alternating); the ratio to in-process is the median of the trials' own
   ratios, since this machine's speed drifts between trials (in-process alone varied by
   up to 1.4x from one trial to the next on the same prompt, measured).
2. Concurrency: N = 1, 4, 16 clients at once, each with its own prompt (30-60 tokens),
   128 tokens each, greedy. Aggregate tokens/s = all completion tokens / wall time from the
   first request sent to the last one done. Time to first token (TTFT) is measured by each
   client from sending its request to its first token; every client is connected before
   the clock starts (mlx_lm closes its HTTP/1.0 connection after each reply, so each of its
   requests gets a fresh, pre-opened TCP connection). p99 is nearest-rank, which is the
   maximum below 100 samples (it is, here: 16 clients x 3 rounds = 48 samples). The
   servers take turns, the order alternating by round; the ratio shown is of the totals
   over all rounds (the JSON also has each round's own ratio).
3. Typing: a prompt (a ~400-token file) grows by a few characters per step; each step
   starts a streaming completion (32 tokens) the moment the previous one's first token
   arrived, and cancels that previous one: mlxd in the same request (``supersedes``),
   mlx_lm by closing the previous HTTP connection before opening the next (its connect is
   timed: an editor pays it on every request). Each session first sends the untyped file
   once, untimed, as an editor does on opening it. Median and p90 TTFT per step.
4. Peak memory: each server process's resident-set high-water mark (``VmHWM`` in
   /proc/PID/status) at the end of the run.

Prompt caches: in workloads 1 and 2 no prompt shares more than its first (BOS) token with
any other prompt sent before it (checked), and mlxd requests pass ``cache=False``, so
neither server gains from a prompt cache there. In workload 3 mlxd's prompt cache is ON,
since reusing the previous keystroke's state is the point; mlx_lm's is always on.

Issue 4's targets are printed with the results, PASS or MISS: mlxd's aggregate tokens/s at
16 clients >= 1.5x mlx_lm server's; mlxd's p99 TTFT at 16 clients <= 0.5x mlx_lm server's;
mlxd single-stream decode >= 0.95x in-process.

BLAS regimes: ``--blas reference|openblas|both`` (default both) is the BLAS MLX multiplies
with in all three contestants: the Linux wheel's reference BLAS, or the system's OpenBLAS,
preloaded. ``both`` runs everything above once in each regime, one after the other, each in
a process of its own, and ends with the key figures side by side (bench/blas_regime.py;
without OpenBLAS installed, the reference regime alone, and how to install it).

    python bench/concurrency.py [--trials 9] [--rounds 3] [--clients 1 4 16] [--typing-sessions 2]
                                [--blas reference|openblas|both]

Prints a table per regime and writes bench/results/concurrency.json (``regimes``: each
one's results). Traffic stays on a Unix socket and on 127.0.0.1. Takes about 2.5 minutes
per regime on 2 x86 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blas_regime
from servers import free_port, revision, start_mlx_lm, start_mlxd, stop, wait_http, wait_mlxd

from clients import (
    MODEL,
    HttpStream,
    Prompts,
    Reply,
    http_request,
    memory,
    mlxd_request,
    note_done,
    percentile,
    run,
)

SINGLE_TOKENS = 256
BURST_TOKENS = 128
TYPING_TOKENS = 32
TYPING_STEPS = 15
TYPING_STEP_CHARS = 5
BASE_TOKENS = 400
# What the "user" types into the file, a few characters per step (>= 15 steps' worth).
TYPED = (
    "def ship_cost(order, rate=0.25):\n"
    "    weight = sum(item.weight for item in order.items)\n"
    "    return round(weight * rate, 2)\n"
)
TARGETS = {
    "aggregate_tps_16": 1.5,  # mlxd / mlx_lm server, at least
    "p99_ttft_16": 0.5,  # mlxd / mlx_lm server, at most
    "single_stream": 0.95,  # mlxd / in-process, at least
}
# ---------------------------------------------------------------------- workloads


def in_process(model: Any, tokenizer: Any, prompt: str, tokens: int) -> Reply:
    from mlx_lm import stream_generate

    reply = Reply(sent_at=time.perf_counter())
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
        now = time.perf_counter()
        reply.first_at = reply.first_at or now
        reply.last_at = now
        reply.tokens += 1
    return reply


def in_process_burst(model: Any, tokenizer: Any, prompts: list[str], tokens: int) -> Burst:
    """The same burst on mlx-lm's ``BatchGenerator`` in this process, with no server, no
    socket and no detokenizing: the most any server built on it can reach here."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(
        model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], completion_batch_size=32
    )
    sent = time.perf_counter()
    replies = {}
    uids = generator.insert(
        [list(tokenizer.encode(p)) for p in prompts],
        max_tokens=[tokens] * len(prompts),
    )
    for uid in uids:
        replies[uid] = Reply(sent_at=sent)
    try:
        while any(r.done_at is None for r in replies.values()):
            for response in generator.next_generated():
                now = time.perf_counter()
                reply = replies[response.uid]
                reply.first_at = reply.first_at or now
                reply.last_at = now
                reply.tokens += 1
                if response.finish_reason is not None:
                    reply.done_at = now
                    reply.finish_reason = response.finish_reason
    finally:
        generator.close()
    return Burst([replies[uid] for uid in uids])


async def http_single(port: int, prompt: str, tokens: int) -> Reply:
    return await http_request(await HttpStream(port).connect(), prompt, tokens)


async def mlxd_single(sock: Path, prompt: str, tokens: int) -> Reply:
    from mlxd.client import AsyncClient

    async with AsyncClient(sock, name="bench-concurrency") as client:
        return await mlxd_request(client, prompt, tokens, cache=False)


@dataclass
class Burst:
    """N clients at once: their replies, and the wall time from first send to last done."""

    replies: list[Reply]
    wall_s: float = 0.0
    tokens: int = 0
    mean_batch: float | None = None
    """mlxd only: tokens generated / decode steps during the burst (its own counters)."""

    def __post_init__(self) -> None:
        self.wall_s = max(r.done_at or 0.0 for r in self.replies) - min(
            r.sent_at for r in self.replies
        )
        self.tokens = sum(r.tokens for r in self.replies)


async def http_burst(port: int, prompts: list[str], tokens: int) -> Burst:
    # Connect everyone first: only the requests themselves are timed.
    conns = [await HttpStream(port).connect() for _ in prompts]
    replies = await asyncio.gather(
        *(http_request(c, p, tokens) for c, p in zip(conns, prompts, strict=True))
    )
    return Burst(list(replies))


async def mlxd_burst(sock: Path, prompts: list[str], tokens: int) -> Burst:
    from mlxd.client import AsyncClient

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(AsyncClient(sock, name=f"bench-client-{i}"))
            for i in range(len(prompts))
        ]
        before = await clients[0].stats()
        replies = await asyncio.gather(
            *(
                mlxd_request(c, p, tokens, cache=False)
                for c, p in zip(clients, prompts, strict=True)
            )
        )
        after = await clients[0].stats()
    burst = Burst(list(replies))
    steps = after.decode_steps - before.decode_steps
    if steps:
        burst.mean_batch = (after.tokens_generated - before.tokens_generated) / steps
    return burst


async def http_typing(port: int, base: str, steps: list[str]) -> list[Reply]:
    await http_single(port, base, TYPING_TOKENS)  # the file as opened, untimed
    replies: list[Reply] = []
    previous: HttpStream | None = None
    for text in steps:
        if previous is not None:
            previous.close()  # the cancel, before the next keystroke's request
        start = time.perf_counter()
        previous = await HttpStream(port).connect()
        reply = await previous.send(base + text, TYPING_TOKENS)
        reply.sent_at = start  # the connect is part of what an editor waits for
        await previous.read_until_first(reply)
        replies.append(reply)
    if previous is not None:
        previous.close()
    return replies


async def mlxd_typing(sock: Path, base: str, steps: list[str]) -> list[Reply]:
    from mlxd.client import AsyncClient

    replies: list[Reply] = []
    async with AsyncClient(sock, name="bench-typing") as client:
        await mlxd_request(client, base, TYPING_TOKENS)  # the file as opened, untimed
        previous = None
        for text in steps:
            # The new request cancels the previous one itself: no separate round trip.
            superseded = previous.id if previous is not None else None
            stream = client.stream(
                base + text,
                model=MODEL,
                max_tokens=TYPING_TOKENS,
                temperature=0.0,
                supersedes=superseded,
            )
            reply = Reply(sent_at=time.perf_counter())
            async for chunk in stream:
                if chunk.tokens:
                    reply.first_at = time.perf_counter()
                    break  # leaving the loop sends no cancel: the next step supersedes it
            if reply.first_at is None:
                raise RuntimeError("a typing step ended before its first token")
            replies.append(reply)
            if previous is not None:
                # Read the superseded request to its `done` (cancelled), noting its cache use.
                async for _ in previous:
                    pass
                note_done(replies[-2], previous.done)
            previous = stream
        if previous is not None:
            await previous.aclose()
            if previous.done is not None:
                note_done(replies[-1], previous.done)
    return replies


def burst_summary(bursts: list[Burst]) -> dict[str, Any]:
    ttfts = [r.ttft_s for b in bursts for r in b.replies]
    out: dict[str, Any] = {
        "rounds": len(bursts),
        "requests": len(ttfts),
        # Over all rounds: total tokens over total wall time.
        "aggregate_tps": sum(b.tokens for b in bursts) / sum(b.wall_s for b in bursts),
        "aggregate_tps_rounds": [b.tokens / b.wall_s for b in bursts],
        "wall_s_rounds": [b.wall_s for b in bursts],
        "tokens": sum(b.tokens for b in bursts),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "ttft_s": ttfts,
        "finish_reasons": sorted({r.finish_reason or "?" for b in bursts for r in b.replies}),
    }
    batches = [b.mean_batch for b in bursts if b.mean_batch is not None]
    if batches:
        out["mean_batch"] = statistics.mean(batches)
    return out


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=9, help="single-stream trials")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--typing-sessions", type=int, default=2)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "concurrency.json")
    )
    blas_regime.add_argument(parser)
    args = parser.parse_args()
    regime = blas_regime.child_regime()
    if regime is None:  # this process runs each regime's run, then the side by side
        blas_regime.run_regimes(args.blas, Path(args.out), "concurrency", figures)
        return
    began = time.perf_counter()
    load_start = os.getloadavg()
    measured = revision()  # now: the daemon about to start runs this tree

    import mlx.core as mx
    from mlx_lm import __version__ as mlx_lm_version
    from mlx_lm import load

    from mlxd.daemon.demo_model import SIZES, build_demo_model

    work = Path(tempfile.mkdtemp(prefix="mlxd-bench-", dir="/tmp"))
    model_dir = build_demo_model(work / MODEL, size=MODEL)
    model, tokenizer = load(str(model_dir))

    # Every prompt of the run, built up front so that none shares a first token with another.
    prompts = Prompts(tokenizer)
    warm_single = prompts.short()
    warm_burst = [prompts.short() for _ in range(max(args.clients))]
    single_prompts = [prompts.short() for _ in range(args.trials)]
    burst_prompts = {
        n: [[prompts.short() for _ in range(n)] for _ in range(args.rounds)] for n in args.clients
    }
    typing_bases = [prompts.file(BASE_TOKENS) for _ in range(args.typing_sessions)]
    steps = [
        TYPED[:n]
        for n in range(TYPING_STEP_CHARS, TYPING_STEP_CHARS * TYPING_STEPS + 1, TYPING_STEP_CHARS)
    ]

    single: dict[str, list[Reply]] = {"in_process": [], "mlx_lm": [], "mlxd": []}
    bursts: dict[str, dict[int, list[Burst]]] = {
        name: {n: [] for n in args.clients} for name in ("in_process", "mlx_lm", "mlxd")
    }
    typing: dict[str, list[Reply]] = {"mlx_lm": [], "mlxd": []}
    mem: dict[str, dict[str, int]] = {}
    mlxd = mlx_lm = None
    port = free_port()
    try:
        mlxd, sock = start_mlxd(work, model_dir, MODEL)
        mlx_lm = start_mlx_lm(work, model_dir, port)
        wait_mlxd(sock, mlxd)
        wait_http(port, mlx_lm)
        blas_regime.check_process(mlxd.pid, regime, "mlxd")
        blas_regime.check_process(mlx_lm.pid, regime, "mlx_lm server")
        # Warm up: load the model, and run a single stream and a full-size burst on each,
        # so first-use costs (allocations, batch set-up) land in no measured row.
        in_process(model, tokenizer, warm_single, 32)
        run(mlxd_single(sock, warm_single, 32))
        run(http_single(port, warm_single, 32))
        run(mlxd_burst(sock, warm_burst, 8))
        run(http_burst(port, warm_burst, 8))

        def order(i: int) -> list[str]:
            # Alternate who goes first, so that no one always runs on a cooler (or hotter) CPU.
            return ["mlxd", "mlx_lm"] if i % 2 == 0 else ["mlx_lm", "mlxd"]

        print("1. single stream ...", flush=True)
        for i, prompt in enumerate(single_prompts):
            single["in_process"].append(in_process(model, tokenizer, prompt, SINGLE_TOKENS))
            for name in order(i):
                if name == "mlxd":
                    single[name].append(run(mlxd_single(sock, prompt, SINGLE_TOKENS)))
                else:
                    single[name].append(run(http_single(port, prompt, SINGLE_TOKENS)))

        print("2. concurrency ...", flush=True)
        for n in args.clients:
            for r, round_prompts in enumerate(burst_prompts[n]):
                bursts["in_process"][n].append(
                    in_process_burst(model, tokenizer, round_prompts, BURST_TOKENS)
                )
                for name in order(r):
                    if name == "mlxd":
                        burst = run(mlxd_burst(sock, round_prompts, BURST_TOKENS))
                    else:
                        burst = run(http_burst(port, round_prompts, BURST_TOKENS))
                    bursts[name][n].append(burst)

        print("3. typing ...", flush=True)
        for i, base in enumerate(typing_bases):
            for name in order(i):
                if name == "mlxd":
                    typing[name] += run(mlxd_typing(sock, base, steps))
                else:
                    typing[name] += run(http_typing(port, base, steps))

        # 4. Peak memory, read while both are still alive.
        mem = {"mlxd": memory(mlxd.pid), "mlx_lm": memory(mlx_lm.pid)}
    finally:
        stop(mlxd)
        stop(mlx_lm)
        log_path = work / "mlx_lm_server.log"
        mlx_lm_log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""

    result = summarise(
        args,
        single=single,
        bursts=bursts,
        typing=typing,
        mem=mem,
        prompts=prompts,
        base_tokens=[len(prompts.ids(b)) for b in typing_bases],
        steps=len(steps),
    )
    config = SIZES[MODEL]
    result.update(
        {
            "machine": platform.machine(),
            "system": platform.system(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm_version,
            "blas": regime,
            "mlxd_revision": measured,
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "model": {
                "size": MODEL,
                "layers": config["num_hidden_layers"],
                "hidden": config["hidden_size"],
                "intermediate": config["intermediate_size"],
                "heads": config["num_attention_heads"],
                "kv_heads": config["num_key_value_heads"],
                "vocab": config["vocab_size"],
            },
            "mlx_lm_log_tail": mlx_lm_log,
        }
    )
    shutil.rmtree(work, ignore_errors=True)
    result["run_s"] = time.perf_counter() - began
    print_table(result)
    print(f"\nwhole run {result['run_s']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def summarise(
    args: argparse.Namespace,
    *,
    single: dict[str, list[Reply]],
    bursts: dict[str, dict[int, list[Burst]]],
    typing: dict[str, list[Reply]],
    mem: dict[str, dict[str, int]],
    prompts: Prompts,
    base_tokens: list[int],
    steps: int,
) -> dict[str, Any]:
    single_out: dict[str, Any] = {}
    for name, replies in single.items():
        tps = [r.decode_tps() for r in replies]
        single_out[name] = {
            "decode_tps": statistics.median(tps),
            "trials_tps": tps,
            "tokens": [r.tokens for r in replies],
        }
    reference = single_out["in_process"]["trials_tps"]
    for entry in single_out.values():
        # Paired by trial: the three ran back to back, on the machine as it was then.
        ratios = [t / ref for t, ref in zip(entry["trials_tps"], reference, strict=True)]
        entry["trial_ratios"] = ratios
        entry["ratio_to_in_process"] = statistics.median(ratios)

    conc: dict[str, Any] = {}
    for n in args.clients:
        row = {name: burst_summary(bursts[name][n]) for name in ("in_process", "mlx_lm", "mlxd")}
        # Same prompts, both greedy: the texts should match (a check, not a measurement).
        pairs = [
            (a.text, b.text)
            for ba, bb in zip(bursts["mlx_lm"][n], bursts["mlxd"][n], strict=True)
            for a, b in zip(ba.replies, bb.replies, strict=True)
        ]
        row["same_text"] = sum(a == b for a, b in pairs)
        row["aggregate_ratio"] = row["mlxd"]["aggregate_tps"] / row["mlx_lm"]["aggregate_tps"]
        row["aggregate_ratio_rounds"] = [
            a / b
            for a, b in zip(
                row["mlxd"]["aggregate_tps_rounds"],
                row["mlx_lm"]["aggregate_tps_rounds"],
                strict=True,
            )
        ]
        row["p99_ttft_ratio"] = row["mlxd"]["ttft_p99_s"] / row["mlx_lm"]["ttft_p99_s"]
        # What the hardware allows: the in-process BatchGenerator over mlx_lm server.
        row["limit_aggregate_ratio"] = (
            row["in_process"]["aggregate_tps"] / row["mlx_lm"]["aggregate_tps"]
        )
        row["limit_p99_ttft_ratio"] = row["in_process"]["ttft_p99_s"] / row["mlx_lm"]["ttft_p99_s"]
        row["mlxd_of_limit"] = row["mlxd"]["aggregate_tps"] / row["in_process"]["aggregate_tps"]
        conc[str(n)] = row

    typing_out: dict[str, Any] = {}
    for name, replies in typing.items():
        ttfts = [r.ttft_s for r in replies]
        entry: dict[str, Any] = {
            "ttft_median_s": statistics.median(ttfts),
            "ttft_p90_s": percentile(ttfts, 0.9),
            "ttft_s": ttfts,
        }
        kinds = [r.cache_kind for r in replies if r.cache_kind is not None]
        if kinds:
            entry["cache_kinds"] = {k: kinds.count(k) for k in sorted(set(kinds))}
            entry["cached_tokens"] = [r.cached_tokens for r in replies]
            entry["finish_reasons"] = [r.finish_reason for r in replies]
        typing_out[name] = entry

    top = str(max(args.clients))
    verdicts = {
        "single_stream": single_out["mlxd"]["ratio_to_in_process"] >= TARGETS["single_stream"],
    }
    if "16" in conc:
        verdicts["aggregate_tps_16"] = conc["16"]["aggregate_ratio"] >= TARGETS["aggregate_tps_16"]
        verdicts["p99_ttft_16"] = conc["16"]["p99_ttft_ratio"] <= TARGETS["p99_ttft_16"]
    return {
        "benchmark": "concurrency",
        "prompt_tokens": {
            "min": min(prompts.lengths),
            "max": max(prompts.lengths),
            "mean": statistics.mean(prompts.lengths),
        },
        "single_tokens": SINGLE_TOKENS,
        "burst_tokens": BURST_TOKENS,
        "typing": {
            "steps": steps,
            "step_chars": TYPING_STEP_CHARS,
            "max_tokens": TYPING_TOKENS,
            "sessions": args.typing_sessions,
            "base_tokens": base_tokens,
        },
        "trials": args.trials,
        "rounds": args.rounds,
        "largest_clients": int(top),
        "single_stream": single_out,
        "concurrency": conc,
        "typing_ttft": typing_out,
        "peak_memory": mem,
        "targets": TARGETS,
        "verdicts": {k: "PASS" if v else "MISS" for k, v in verdicts.items()},
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


NAMES = {"in_process": "mlx-lm in-process", "mlx_lm": "mlx_lm server", "mlxd": "mlxd"}
BURST_NAMES = {"in_process": "BatchGenerator", "mlx_lm": "mlx_lm server", "mlxd": "mlxd"}


def print_table(res: dict[str, Any]) -> None:
    m = res["model"]
    print(
        f"\nconcurrency: {m['size']} model ({m['layers']} layers x {m['hidden']}), "
        f"{res['cpus']} CPUs, mlx {res['mlx']}, mlx-lm {res['mlx_lm']}, BLAS {res['blas']}; "
        f"prompts {res['prompt_tokens']['min']}-{res['prompt_tokens']['max']} tokens"
    )
    print(
        f"\n1. single-stream decode, greedy, {res['single_tokens']} tokens, "
        f"median of {res['trials']} trials (ratio: median of per-trial ratios)"
    )
    print(f"{'':<20}{'tok/s':>10}{'vs in-process':>16}{'trials min-max tok/s':>24}")
    for name, entry in res["single_stream"].items():
        spread = f"{min(entry['trials_tps']):.0f}-{max(entry['trials_tps']):.0f}"
        print(
            f"{NAMES[name]:<20}{entry['decode_tps']:>10.1f}"
            f"{entry['ratio_to_in_process']:>15.3f}x{spread:>24}"
        )

    print(
        f"\n2. concurrency: {res['burst_tokens']} tokens each, distinct prompts, no prompt "
        f"cache, {res['rounds']} rounds; TTFT client side, p99 = max below 100 samples"
    )
    print(
        f"{'clients':<9}{'server':<15}{'agg tok/s':>11}{'TTFT p50':>12}{'TTFT p99':>12}"
        f"{'mean batch':>12}{'   mlxd/mlx_lm: agg, p99 TTFT'}"
    )
    for n, row in res["concurrency"].items():
        for name in ("in_process", "mlx_lm", "mlxd"):
            e = row[name]
            batch = f"{e['mean_batch']:.1f}" if "mean_batch" in e else "-"
            line = (
                f"{n:<9}{BURST_NAMES[name]:<15}{e['aggregate_tps']:>11.1f}"
                f"{_ms(e['ttft_p50_s']):>12}{_ms(e['ttft_p99_s']):>12}{batch:>12}"
            )
            if name == "mlxd":
                line += f"   {row['aggregate_ratio']:.2f}x, {row['p99_ttft_ratio']:.2f}x"
                line += f"  (same text {row['same_text']}/{e['requests']})"
            if name == "in_process":
                line += (
                    f"   limit/mlx_lm: {row['limit_aggregate_ratio']:.2f}x, "
                    f"{row['limit_p99_ttft_ratio']:.2f}x"
                )
            print(line)

    t = res["typing"]
    print(
        f"\n3. typing: {t['steps']} steps of {t['step_chars']} chars x {t['sessions']} "
        f"sessions on a {t['base_tokens'][0]}-token file, {t['max_tokens']} tokens per step, "
        "each cancelling the previous; mlxd prompt cache ON"
    )
    print(f"{'':<20}{'TTFT median':>14}{'TTFT p90':>12}")
    for name, e in res["typing_ttft"].items():
        line = f"{NAMES[name]:<20}{_ms(e['ttft_median_s']):>14}{_ms(e['ttft_p90_s']):>12}"
        if "cache_kinds" in e:
            line += "   cache: " + ", ".join(f"{k} x{v}" for k, v in e["cache_kinds"].items())
        print(line)

    print("\n4. peak memory (VmHWM) at the end")
    for name, e in res["peak_memory"].items():
        print(f"{NAMES[name]:<20}{e.get('VmHWM', 0) / 2**20:>10.1f} MiB")

    print("\ntargets (issue 4)")
    ss = res["single_stream"]["mlxd"]["ratio_to_in_process"]
    lines = []
    if "16" in res["concurrency"]:
        row = res["concurrency"]["16"]
        lines += [
            (
                "aggregate_tps_16",
                "mlxd agg tok/s @16 >= 1.5x mlx_lm server",
                row["aggregate_ratio"],
            ),
            ("p99_ttft_16", "mlxd p99 TTFT @16 <= 0.5x mlx_lm server", row["p99_ttft_ratio"]),
        ]
    lines.append(("single_stream", "mlxd single stream >= 0.95x in-process", ss))
    for key, label, value in lines:
        print(f"  {label:<44}{value:>7.2f}x  {res['verdicts'][key]}")


def figures(res: dict[str, Any]) -> list[blas_regime.Figure]:
    """The rows of the BLAS regimes' side-by-side table."""
    rows: list[blas_regime.Figure] = [
        (f"1. single stream tok/s, {NAMES[name]}", e["decode_tps"])
        for name, e in res["single_stream"].items()
    ]
    for n, row in res["concurrency"].items():
        for name in ("in_process", "mlx_lm", "mlxd"):
            rows.append(
                (f"2. {n} clients agg tok/s, {BURST_NAMES[name]}", row[name]["aggregate_tps"])
            )
        for name in ("in_process", "mlx_lm", "mlxd"):
            rows.append(
                (f"2. {n} clients p99 TTFT ms, {BURST_NAMES[name]}", row[name]["ttft_p99_s"] * 1e3)
            )
    for name, e in res["typing_ttft"].items():
        rows.append((f"3. typing TTFT median ms, {NAMES[name]}", e["ttft_median_s"] * 1e3))
    for name, e in res["peak_memory"].items():
        rows.append((f"4. peak memory MiB, {NAMES[name]}", e.get("VmHWM", 0) / 2**20))
    return rows


if __name__ == "__main__":
    main()
