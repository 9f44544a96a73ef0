"""Concurrency: mlxd vs mlx-lm's own HTTP server (``mlx_lm server``) and vs the in-process
limit under 1, 4 and 16 closed-loop clients, single-stream decode against mlx-lm
in-process, an editor's typing workload, each server's peak memory, and a per-round
profile of mlxd's worker, on the same model, side by side in one run.

The model is the "small" demo size (4 layers, 128 wide, random weights, built locally): the
shape issue 4's reference numbers for mlx_lm.server were taken on. Compare ratios, not
absolute figures (these machines are noisy). Contestants:

- in-process: mlx-lm's ``stream_generate`` in this process for the single stream, and a
  ``BatchGenerator(completion_batch_size=N, prefill_batch_size=min(N, 8))`` driven by the
  closed loop itself for the concurrency rows: no server, socket or detokenizer, so the
  limit any server built on mlx-lm can approach on this machine;
- mlx_lm server: ``python -m mlx_lm server --model DIR --host 127.0.0.1 --port P`` with its
  defaults (continuous batching, up to 32 decoding) except ``--log-level WARNING``, so that
  neither server spends time logging; streamed OpenAI completions (``POST /v1/completions``)
  over loopback HTTP, read with asyncio streams, a new connection per request (it closes
  each after its reply anyway);
- mlxd: ``python -m mlxd.daemon serve`` over its Unix socket, a new ``AsyncClient`` (a
  connection and its handshake) per request, ``cache=False``.

Workloads:

1. Single stream: greedy, 256 tokens, decode tokens/s measured on the client's side from
   the first generated token to the last. Each trial runs all three back to back (the
   servers' order alternating); the ratio to in-process is the median of the trials' own
   ratios, since this machine's speed drifts between trials (in-process alone varied by
   up to 1.4x from one trial to the next on the same prompt, measured).
2. Closed loop: for each N in ``--clients`` (1, 4, 16), N clients each send ``--requests``
   (2) requests back to back, every request with a distinct prompt of 128 tokens or a few
   fewer (lines of code, the last cut short; lengths recorded), ``max_tokens`` 128,
   greedy. Aggregate tokens/s = all completion tokens / wall time from the first request
   sent to the last one done. Time to first token (TTFT) is measured by each client from
   before it connects (the servers) or inserts its prompt (in-process: each client's next
   prompt goes in the moment its previous one finished) to its first generated token. p99
   is nearest-rank, which is the maximum below 100 samples (16 clients x 2 requests x 3
   rounds = 96). Mean batch: tokens per decode step (mlxd's own counters; the in-process
   generator's steps). Each of ``--rounds`` (3) rounds runs the three contestants on that
   round's prompts, the order rotating by round; the ratios shown are of the totals over
   all rounds (the JSON also has each round's own). Same prompts, all greedy: the texts
   are compared as a sanity check ("same text k/n": all three alike; the in-process text
   is put through mlx-lm's streaming detokenizer once the clock has stopped).
3. Typing: a prompt (a ~400-token file) grows by a few characters per step; each step
   starts a streaming completion (32 tokens) the moment the previous one's first token
   arrived, and cancels that previous one: mlxd in the same request (``supersedes``),
   mlx_lm by closing the previous HTTP connection before opening the next (its connect is
   timed: an editor pays it on every request). Each session first sends the untyped file
   once, untimed, as an editor does on opening it. Median and p90 TTFT per step.
4. Peak memory: each server process's resident-set high-water mark (``VmHWM`` in
   /proc/PID/status) at the end of the run.

4b. Worker profile: once both servers have stopped, a second mlxd, started with
   ``MLXD_PROFILE_ROUNDS`` (daemon/profiling.py), runs a warm-up and then workload 2's
   closed loop at the largest N once (on that N's first-round prompts: its texts are
   compared with that round's), and is stopped (SIGTERM: its worker writes the profile as
   it shuts down). The summary leaves out the warm-up's rounds (the first ones, up to its
   last token): forward passes and sequences per round, a round's wall time, the time in
   the generators and in the worker's own Python per token, and the worker thread's CPU
   share. Under it, the in-process limit's wall time per token at that N, for scale.

Prompt caches: in workloads 1 and 2 no prompt shares more than its first (BOS) token with
any other prompt sent before it (checked), and mlxd requests pass ``cache=False``, so
neither server gains from a prompt cache there. In workload 3 mlxd's prompt cache is ON,
since reusing the previous keystroke's state is the point; mlx_lm's is always on.

Targets, printed PASS or MISS. Issue 4's: mlxd's aggregate tokens/s at 16 clients >= 1.5x
mlx_lm server's; mlxd's p99 TTFT at 16 clients <= 0.5x mlx_lm server's; mlxd single-stream
decode >= 0.95x in-process. Issue 16's, at every N: mlxd's aggregate tokens/s >= 0.95x the
in-process limit's and its p99 TTFT <= 1.1x the limit's; mlxd single-stream decode >= 0.97x
in-process.

BLAS regimes: ``--blas reference|openblas|both`` (default both) is the BLAS MLX multiplies
with in all three contestants: the Linux wheel's reference BLAS, or the system's OpenBLAS,
preloaded. ``both`` runs everything above once in each regime, one after the other, each in
a process of its own, and ends with the key figures (the targets' verdicts and the profile
among them) side by side (bench/blas_regime.py; without OpenBLAS installed, the reference
regime alone, and how to install it).

    python bench/concurrency.py [--trials 9] [--rounds 3] [--requests 2] [--clients 1 4 16]
                                [--typing-sessions 2] [--blas reference|openblas|both]

Prints a table per regime and writes bench/results/concurrency.json (``regimes``: each
one's results). Traffic stays on a Unix socket and on 127.0.0.1. Takes about 2.5 minutes
per regime on 2 x86 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import blas_regime
from concurrency_report import CONTESTANTS, figures, print_table, summarise
from servers import free_port, revision, start_mlx_lm, start_mlxd, stop, wait_http, wait_mlxd

from clients import (
    MODEL,
    HttpPerRequest,
    HttpStream,
    Loop,
    MlxdPerRequest,
    Prompts,
    Reply,
    closed_loop,
    in_process,
    in_process_loop,
    memory,
    mlxd_loop,
    mlxd_request,
    note_done,
    pooled,
    rotate,
    run,
    single,
)

SINGLE_TOKENS = 256
LOOP_TOKENS = 128
LOOP_PROMPT_TOKENS = 128
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
SERVERS = ("mlxd", "mlx_lm")


# ---------------------------------------------------------------------- workloads


async def http_typing(port: int, base: str, steps: list[str]) -> list[Reply]:
    await single(HttpPerRequest(port), base, TYPING_TOKENS)  # the file as opened, untimed
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


# ---------------------------------------------------------------------- the worker profile


def worker_profile(
    work: Path, model_dir: Path, regime: str, warm: list[list[str]], per_client: list[list[str]]
) -> dict[str, Any]:
    """Workload 4b: one closed loop on a second mlxd that profiles its worker's rounds."""
    from mlxd.daemon.profiling import Round, RoundProfile

    path = work / "profile" / "rounds.json"
    path.parent.mkdir(mode=0o700)  # the daemon's socket folder must be private
    daemon = None
    try:
        env = {"MLXD_PROFILE_ROUNDS": str(path)}
        daemon, sock = start_mlxd(path.parent, model_dir, MODEL, env=env)
        wait_mlxd(sock, daemon)
        blas_regime.check_process(daemon.pid, regime, "mlxd (profiled)")
        warm_up = run(closed_loop(MlxdPerRequest(sock), warm, 8))
        loop = run(mlxd_loop(sock, per_client, LOOP_TOKENS))
    finally:
        stop(daemon)  # SIGTERM: the worker writes the profile as it shuts down
    if not path.exists():
        raise RuntimeError(f"mlxd (profiled) exited {daemon.returncode} without a profile")
    rounds = [Round(**r) for r in json.loads(path.read_text())["rounds"]]
    # The warm-up's rounds come first, and end with its last token: the loop started after.
    skip, seen, k = sum(r.tokens for r in warm_up.replies), 0, 0
    while k < len(rounds) and seen < skip:
        seen, k = seen + rounds[k].tokens, k + 1
    if seen != skip:
        raise RuntimeError(f"the profile's first rounds made {seen} tokens, the warm-up {skip}")
    return {
        "clients": len(per_client),
        "requests": len(loop.replies),
        "warm_up_rounds": k,
        "summary": RoundProfile(path, rounds[k:]).summary(),
        "loop": pooled([loop], each="rounds"),
        "texts": [r.text for r in loop.replies],
    }


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=9, help="single-stream trials")
    parser.add_argument("--rounds", type=int, default=3, help="closed loops per client count")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
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
    top = max(args.clients)

    # Every prompt of the run, built up front so that none shares a first token with another.
    prompts = Prompts(tokenizer)
    warm_single = prompts.short()
    single_prompts = [prompts.short() for _ in range(args.trials)]
    warm_loop = [[prompts.code(LOOP_PROMPT_TOKENS)] for _ in range(top)]
    loop_prompts = {
        n: [
            [[prompts.code(LOOP_PROMPT_TOKENS) for _ in range(args.requests)] for _ in range(n)]
            for _ in range(args.rounds)
        ]
        for n in args.clients
    }
    typing_bases = [prompts.file(BASE_TOKENS) for _ in range(args.typing_sessions)]
    steps = [
        TYPED[:n]
        for n in range(TYPING_STEP_CHARS, TYPING_STEP_CHARS * TYPING_STEPS + 1, TYPING_STEP_CHARS)
    ]

    singles: dict[str, list[Reply]] = {name: [] for name in CONTESTANTS}
    loops: dict[str, dict[int, list[Loop]]] = {
        name: {n: [] for n in args.clients} for name in CONTESTANTS
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
        backends = {"mlxd": MlxdPerRequest(sock), "mlx_lm": HttpPerRequest(port)}
        # Warm up: load the model, and run a single stream and a full-size loop on each,
        # so first-use costs (allocations, batch set-up) land in no measured row.
        in_process(model, tokenizer, warm_single, 32)
        in_process_loop(model, tokenizer, warm_loop, 8)
        for backend in backends.values():
            run(single(backend, warm_single, 32))
            run(closed_loop(backend, warm_loop, 8))

        print("1. single stream ...", flush=True)
        for i, prompt in enumerate(single_prompts):
            singles["in_process"].append(in_process(model, tokenizer, prompt, SINGLE_TOKENS))
            for name in rotate(SERVERS, i):
                singles[name].append(run(single(backends[name], prompt, SINGLE_TOKENS)))

        print("2. closed loop ...", flush=True)
        for n in args.clients:
            for r, per_client in enumerate(loop_prompts[n]):
                for name in rotate(CONTESTANTS, r):
                    if name == "in_process":
                        loop = in_process_loop(model, tokenizer, per_client, LOOP_TOKENS)
                    elif name == "mlxd":
                        loop = run(mlxd_loop(sock, per_client, LOOP_TOKENS))
                    else:
                        loop = run(closed_loop(backends[name], per_client, LOOP_TOKENS))
                    loops[name][n].append(loop)

        print("3. typing ...", flush=True)
        for i, base in enumerate(typing_bases):
            for name in rotate(SERVERS, i):
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

    print(f"4b. worker profile at {top} clients ...", flush=True)
    profile = worker_profile(work, model_dir, regime, warm_loop, loop_prompts[top][0])

    result = summarise(args, singles=singles, loops=loops, typing=typing, mem=mem)
    result.update(single_tokens=SINGLE_TOKENS, loop_tokens=LOOP_TOKENS)
    result["prompt_tokens"] = {
        "single": [len(prompts.ids(p)) for p in single_prompts],
        "loop": [
            len(prompts.ids(p))
            for rounds in loop_prompts.values()
            for per_client in rounds
            for client in per_client
            for p in client
        ],
        "typing_base": [len(prompts.ids(b)) for b in typing_bases],
    }
    result["typing"] = {"steps": len(steps), "step_chars": TYPING_STEP_CHARS,
                        "max_tokens": TYPING_TOKENS, "sessions": args.typing_sessions}  # fmt: skip
    # The profiled loop ran round 0's prompts at the largest N: its texts should match.
    first = loops["mlxd"][top][0].replies
    profile["same_text"] = sum(
        a == r.text for a, r in zip(profile.pop("texts"), first, strict=True)
    )
    result["worker_profile"] = profile
    config = SIZES[MODEL]
    result.update(
        machine=platform.machine(), system=platform.system(), python=platform.python_version(),
        cpus=os.cpu_count(), mlx=mx.__version__, mlx_lm=mlx_lm_version, blas=regime,
        mlxd_revision=measured, load_average_start=load_start, load_average_end=os.getloadavg(),
        model={"size": MODEL, "layers": config["num_hidden_layers"],
               "hidden": config["hidden_size"], "intermediate": config["intermediate_size"],
               "heads": config["num_attention_heads"], "kv_heads": config["num_key_value_heads"],
               "vocab": config["vocab_size"]},
        mlx_lm_log_tail=mlx_lm_log,
    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    result["run_s"] = time.perf_counter() - began
    print_table(result)
    print(f"\nwhole run {result['run_s']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
