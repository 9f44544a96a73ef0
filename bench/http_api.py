"""HTTP: mlxd's OpenAI API against mlxd's native socket and mlx-lm's own server
(``mlx_lm server``), side by side in one run, on the same locally built model (the "small"
demo size, as bench/concurrency.py; its tokenizer has a chat template, so every request is
a chat: the same messages, the same template, the same prompt tokens on all three).

(Named ``http_api.py``, not ``http.py``: a ``bench/http.py`` would shadow the standard
library's ``http`` for every script in bench/, since Python puts a script's folder first
on ``sys.path``.)

Contestants, each asked for greedy (temperature 0) streamed completions:

- native: ``mlxd.client.AsyncClient`` over the Unix socket, ``stream(messages=...)``;
- http: the same daemon's ``POST /v1/chat/completions`` (``--http 127.0.0.1:PORT``),
  ``stream: true``, read as server-sent events with aiohttp's client (one session per
  simulated client, so one kept-alive connection each);
- mlx_lm: ``python -m mlx_lm server`` (defaults but ``--log-level WARNING``), its
  ``POST /v1/chat/completions`` streamed, read by the same client code as http (it answers
  in HTTP/1.0 and closes after each reply, so each of its requests opens a connection).
  Each mlxd HTTP client opens its connection (``GET /v1/models``) before the clock starts,
  as each native client does (``--cold``: on its first timed request instead).

mlxd requests pass ``cache=False`` (native field; an extra body field over HTTP) and no two
prompts share more than the chat template's opening and BOS (bench/clients.Prompts),
so no server gains from a prompt cache. Tokens: the server's ``usage.completion_tokens``.

1. Single stream: 256 tokens; decode tokens/s on the client's side, from the first token
   to the last. Each trial runs the three back to back on one prompt (the order rotating);
   ratios are medians of the trials' own ratios (this machine drifts between trials).
2. Closed loop: N = 1, 4, 16 clients, each sending its ``--rounds`` requests back to back
   (its own prompts), 128 tokens each, ``--repeats`` times (the order rotating). Aggregate
   tokens/s = all completion tokens / wall time from the first send to the last done
   (summed over repeats); TTFT = send to first non-empty content, per
   request; p99 nearest rank (below 100 samples: the maximum).

Issue 14's targets, printed PASS or MISS: http single-stream decode >= 0.97x native; http
aggregate tokens/s at 16 clients >= 1.3x mlx_lm's, with p99 TTFT <= 0.5x mlx_lm's.

    python bench/http_api.py [--trials 9] [--rounds 4] [--repeats 2] [--tokens 128] [--cold]

Prints a table and writes bench/results/http.json. Traffic stays on a Unix socket and on
127.0.0.1. Takes about 2 minutes on 2 x86 cores (more when they are shared).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from servers import free_port, revision, start_mlx_lm, start_mlxd, stop, wait_http, wait_mlxd

from clients import (
    MODEL,
    Loop,
    Prompts,
    Reply,
    closed_loop,
    mlxd_request,
    pooled,
    rotate,
    run,
    single,
)

SINGLE_TOKENS = 256
NAMES = ("native", "http", "mlx_lm")
TARGETS = {
    "single_stream": 0.97,  # http / native decode tok/s, at least
    "aggregate_tps_16": 1.3,  # http / mlx_lm aggregate tok/s at 16 clients, at least
    "p99_ttft_16": 0.5,  # http / mlx_lm p99 TTFT at 16 clients, at most
}


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


class Native:
    """mlxd over its Unix socket: one ``AsyncClient`` (connection) per simulated client."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        from mlxd.client import AsyncClient

        async with AsyncClient(self.sock, name="bench-http") as client:
            yield client

    async def request(self, client: Any, prompt: str, tokens: int) -> Reply:
        return await mlxd_request(client, None, tokens, messages=messages(prompt), cache=False)


class Sse:
    """An OpenAI chat completions endpoint, streamed; one aiohttp session per client.
    ``keep``: a GET that opens the session's connection before it is timed (as a native
    client connects before it asks), for a server that keeps connections alive."""

    def __init__(self, url: str, extra: dict[str, Any], keep: str | None = None) -> None:
        self.url = url
        self.extra = extra
        self.keep = keep

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=1)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            if self.keep:
                async with session.get(self.keep) as response:
                    await response.read()
            yield session

    async def request(self, session: Any, prompt: str, tokens: int) -> Reply:
        usage = {"include_usage": True}
        body = {"messages": messages(prompt), "max_tokens": tokens, "temperature": 0.0,
                "stream": True, "stream_options": usage, **self.extra}  # fmt: skip
        reply = Reply(sent_at=time.perf_counter())
        async with session.post(self.url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{self.url}: {response.status} {await response.text()}")
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": keepalive" comments
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    reply.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        reply.token(content)
        reply.done_at = time.perf_counter()
        reply.tokens = reply.tokens or reply.events
        return reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=9, help="single-stream trials")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client")
    parser.add_argument("--repeats", type=int, default=2, help="closed loops per N per server")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--tokens", type=int, default=128, help="max_tokens per closed-loop request"
    )
    parser.add_argument("--single-tokens", type=int, default=SINGLE_TOKENS)
    parser.add_argument(
        "--cold", action="store_true", help="HTTP clients connect on their first timed request"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "http.json"))
    args = parser.parse_args()
    began = time.perf_counter()
    load_start = os.getloadavg()
    measured = revision()

    import mlx.core as mx
    from mlx_lm import __version__ as mlx_lm_version
    from mlx_lm.utils import load_tokenizer

    from mlxd.daemon.demo_model import SIZES, build_demo_model

    work = Path(tempfile.mkdtemp(prefix="mlxd-bench-http-", dir="/tmp"))
    model_dir = build_demo_model(work / MODEL, size=MODEL)
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.chat_template, "the demo model has no chat template"

    prompts = Prompts(tokenizer)
    warm = [prompts.short() for _ in range(max(args.clients))]
    single_prompts = [prompts.short() for _ in range(args.trials)]
    loop_prompts = [
        {n: [[prompts.short() for _ in range(args.rounds)] for _ in range(n)] for n in args.clients}
        for _ in range(args.repeats)
    ]

    singles: dict[str, list[Reply]] = {name: [] for name in NAMES}
    loops: dict[str, dict[int, list[Loop]]] = {
        name: {n: [] for n in args.clients} for name in NAMES
    }
    mlxd = mlx_lm = None
    http_port, lm_port = free_port(), free_port()
    try:
        mlxd, sock = start_mlxd(work, model_dir, MODEL, ["--http", f"127.0.0.1:{http_port}"])
        mlx_lm = start_mlx_lm(work, model_dir, lm_port)
        wait_mlxd(sock, mlxd)
        wait_http(lm_port, mlx_lm)
        chat, mlxd_url = "/v1/chat/completions", f"http://127.0.0.1:{http_port}"
        fields = {"model": MODEL, "cache": False}
        backends: dict[str, Any] = {
            "native": Native(sock),
            "http": Sse(
                mlxd_url + chat, fields, keep=None if args.cold else mlxd_url + "/v1/models"
            ),
            "mlx_lm": Sse(f"http://127.0.0.1:{lm_port}{chat}", {}),  # its one model
        }
        # Warm up: a single stream and a full-size burst each, so first-use costs (model
        # load, allocations, batch set-up) land in no measured row.
        for backend in backends.values():
            run(single(backend, warm[0], 16))
            run(closed_loop(backend, [[p] for p in warm], 8))

        print("1. single stream ...", flush=True)
        for i, prompt in enumerate(single_prompts):
            for name in rotate(NAMES, i):
                singles[name].append(run(single(backends[name], prompt, args.single_tokens)))

        print("2. closed loop ...", flush=True)
        for rep, per_n in enumerate(loop_prompts):
            for i, n in enumerate(args.clients):
                for name in rotate(NAMES, rep + i):
                    loop = run(closed_loop(backends[name], per_n[n], args.tokens))
                    loops[name][n].append(loop)
    finally:
        stop(mlxd)
        stop(mlx_lm)
        log_path = work / "mlx_lm_server.log"
        mlx_lm_log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""

    result = summarise(args, singles, loops, prompts)
    config = SIZES[MODEL]
    result.update(
        machine=platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
        mlx=mx.__version__, mlx_lm=mlx_lm_version, ld_preload=os.environ.get("LD_PRELOAD", ""),
        mlxd_revision=measured, load_average_start=load_start, load_average_end=os.getloadavg(),
        model={"size": MODEL, "layers": config["num_hidden_layers"],
               "hidden": config["hidden_size"], "vocab": config["vocab_size"]},
        mlx_lm_log_tail=mlx_lm_log,
    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    result["run_s"] = time.perf_counter() - began
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwhole run {result['run_s']:.0f} s; wrote {out}")


def summarise(
    args: argparse.Namespace,
    singles: dict[str, list[Reply]],
    loops: dict[str, dict[int, Loop]],
    prompts: Prompts,
) -> dict[str, Any]:
    single_out: dict[str, Any] = {}
    for name, replies in singles.items():
        tps = [r.decode_tps() for r in replies]
        single_out[name] = {"decode_tps": statistics.median(tps), "trials_tps": tps,
                            "tokens": [r.tokens for r in replies]}  # fmt: skip

    def paired(a: str, b: str) -> float:
        ta, tb = single_out[a]["trials_tps"], single_out[b]["trials_tps"]
        return statistics.median(x / y for x, y in zip(ta, tb, strict=True))

    single_out["ratios"] = {"http/native": paired("http", "native"),
                            "http/mlx_lm": paired("http", "mlx_lm"),
                            "native/mlx_lm": paired("native", "mlx_lm")}  # fmt: skip
    # Same prompt, all greedy: the texts should match (a check, not a measurement).
    single_out["same_text"] = sum(
        len({singles[name][i].text for name in NAMES}) == 1 for i in range(args.trials)
    )

    conc: dict[str, Any] = {}
    for n in args.clients:
        row: dict[str, Any] = {name: pooled(loops[name][n]) for name in NAMES}
        for a, b in (("http", "native"), ("http", "mlx_lm"), ("native", "mlx_lm")):
            row[f"{a}/{b}"] = {
                "aggregate": row[a]["aggregate_tps"] / row[b]["aggregate_tps"],
                "ttft_p99": row[a]["ttft_p99_s"] / row[b]["ttft_p99_s"],
            }
        each = [[r for lp in loops[name][n] for r in lp.replies] for name in NAMES]
        texts = zip(*each, strict=True)
        row["same_text"] = sum(len({r.text for r in rs}) == 1 for rs in texts)
        conc[str(n)] = row

    verdicts = {"single_stream": single_out["ratios"]["http/native"] >= TARGETS["single_stream"]}
    if "16" in conc:
        ratios = conc["16"]["http/mlx_lm"]
        verdicts["aggregate_tps_16"] = ratios["aggregate"] >= TARGETS["aggregate_tps_16"]
        verdicts["p99_ttft_16"] = ratios["ttft_p99"] <= TARGETS["p99_ttft_16"]
    return {
        "benchmark": "http",
        "endpoint": "/v1/chat/completions (streamed) vs native stream(messages=...)",
        "prompt_tokens": {"min": min(prompts.lengths), "max": max(prompts.lengths)},
        "single_tokens": args.single_tokens, "loop_tokens": args.tokens, "cold": args.cold,
        "trials": args.trials, "rounds": args.rounds, "repeats": args.repeats,
        "single_stream": single_out, "closed_loop": conc, "targets": TARGETS,
        "verdicts": {k: "PASS" if v else "MISS" for k, v in verdicts.items()},
    }  # fmt: skip


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


LABELS = {"native": "mlxd native", "http": "mlxd HTTP", "mlx_lm": "mlx_lm server"}


def print_table(res: dict[str, Any]) -> None:
    m = res["model"]
    preload = f", LD_PRELOAD={Path(res['ld_preload']).name}" if res["ld_preload"] else ""
    print(
        f"\nhttp: {m['size']} model ({m['layers']} layers x {m['hidden']}), {res['cpus']} CPUs, "
        f"mlx {res['mlx']}, mlx-lm {res['mlx_lm']}{preload}; chat prompts "
        f"{res['prompt_tokens']['min']}-{res['prompt_tokens']['max']} tokens before the template; "
        f"load {res['load_average_start'][0]:.2f} -> {res['load_average_end'][0]:.2f}"
    )
    ss = res["single_stream"]
    print(
        f"\n1. single-stream decode, greedy, {res['single_tokens']} tokens, median of "
        f"{res['trials']} trials (same text {ss['same_text']}/{res['trials']})"
    )
    print(f"{'':<16}{'tok/s':>9}{'trials min-max':>17}")
    for name in NAMES:
        e = ss[name]
        spread = f"{min(e['trials_tps']):.0f}-{max(e['trials_tps']):.0f}"
        print(f"{LABELS[name]:<16}{e['decode_tps']:>9.1f}{spread:>17}")
    print("  ratios (median of per-trial): " + ", ".join(
        f"{k} {v:.3f}x" for k, v in ss["ratios"].items()))  # fmt: skip

    print(
        f"\n2. closed loop: each client {res['rounds']} requests back to back, x{res['repeats']}, "
        f"{res['loop_tokens']} tokens each, distinct prompts, no prompt cache"
    )
    print(
        f"{'clients':<9}{'server':<15}{'agg tok/s':>11}{'TTFT p50':>12}{'TTFT p99':>12}"
        "   agg, p99 TTFT ratios"
    )
    for n, row in res["closed_loop"].items():
        for name in NAMES:
            e = row[name]
            line = (
                f"{n:<9}{LABELS[name]:<15}{e['aggregate_tps']:>11.1f}"
                f"{_ms(e['ttft_p50_s']):>12}{_ms(e['ttft_p99_s']):>12}"
            )
            if name == "http":
                hn, hm = row["http/native"], row["http/mlx_lm"]
                line += (
                    f"   /native {hn['aggregate']:.2f}x, {hn['ttft_p99']:.2f}x;"
                    f" /mlx_lm {hm['aggregate']:.2f}x, {hm['ttft_p99']:.2f}x"
                )
            if name == "mlx_lm":
                line += f"   (same text {row['same_text']}/{e['requests']})"
            print(line)

    print("\ntargets (issue 14)")
    lines = [("single_stream", "HTTP single stream >= 0.97x native",
              ss["ratios"]["http/native"])]  # fmt: skip
    if "16" in res["closed_loop"]:
        r = res["closed_loop"]["16"]["http/mlx_lm"]
        lines += [
            ("aggregate_tps_16", "HTTP agg tok/s @16 >= 1.3x mlx_lm server", r["aggregate"]),
            ("p99_ttft_16", "HTTP p99 TTFT @16 <= 0.5x mlx_lm server", r["ttft_p99"]),
        ]
    for key, label, value in lines:
        print(f"  {label:<44}{value:>7.2f}x  {res['verdicts'][key]}")


if __name__ == "__main__":
    main()
