"""Structured output's cost: mlxd's decode tokens/s with and without a JSON-schema
constraint (``Generate.format``) at 1 and 16 concurrent sequences, and what compiling a
schema costs, on the "small" demo model (random weights), in one run (issue 17).

Decode throughput: N clients (``--clients``, 1 and 16) each send one streamed request at
once (a new ``AsyncClient`` per request, ``cache=False``, greedy, the same distinct 30-60
token prompts and ``max_tokens`` every way). Aggregate decode tokens/s = all completion
tokens but each request's first / (the last token's arrival - the first token's), on the
client's side. Each of ``--rounds`` rounds runs, on that round's prompts:

- headline, at equal lengths: "free" (no ``format``) and "long" (``RECORDS``: an object
  whose array of closed objects needs ``minItems`` 1000, a value no request can complete
  within ``max_tokens``, so every constrained sequence, like every free one on these
  models, decodes exactly ``max_tokens`` tokens), who goes first alternating by round.
  Both batches stay full to the end, so their ratio is the masks' cost on decode alone;
- secondary, at natural lengths: "constrained", client i in round r getting schema
  ``(i + r) % len(SCHEMAS)`` (closed objects of enums, bounded integers and numbers,
  bounded arrays, a nested object, that finish on random weights: the value complete, so
  EOS, often well before ``max_tokens``, the batch emptying as they do), then "matched":
  free again, each request's ``max_tokens`` the number of tokens its constrained twin
  produced, so that the batch shrinks step by step as the constrained one's did.

The tables show medians over rounds and the medians of the rounds' own ratios (and their
range). The schemas, and how their compile time is measured: bench/structured_schemas.py.

Target (issue 17), printed and written PASS or MISS on the headline row: at 16 sequences,
"long" aggregate decode tokens/s is at least 0.90x "free" (a constraint costs at most 10%
of decode throughput).

``--blas reference|openblas|both``: the BLAS MLX multiplies with, here and in the daemon
(bench/blas_regime.py); the default is ``openblas`` where it is installed (issue 12's
regime, the one the target is set in), else ``reference``.

    python bench/structured.py [--rounds 9] [--tokens 96] [--clients 1 16] [--quick]
                               [--blas reference|openblas|both]

Prints the tables and writes bench/results/structured.json. ``--quick`` (3 rounds, 48
tokens) takes about half a minute on 2 x86 cores, the defaults about two (per regime).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import blas_regime
from servers import revision, start_mlxd, stop, wait_mlxd
from structured_schemas import (
    ALL_SCHEMAS,
    NAMES,
    RECORDS,
    SCHEMAS,
    compile_in_process,
    compile_on_daemon,
    fmt,
)

from clients import MODEL, Loop, Prompts, Reply, closed_loop, mlxd_request, rotate, run

TARGET = 0.90  # long / free aggregate decode tokens/s at 16 sequences (equal lengths), at least


class Requests:
    """mlxd, a new ``AsyncClient`` per request, ``cache=False``; constrained: request k of
    the loop carries ``schema``, or if None schema ``(k + offset) % len(SCHEMAS)``;
    ``limits``: request k's ``max_tokens`` is ``limits[k]`` rather than the loop's."""

    def __init__(
        self,
        sock: Path,
        constrained: bool,
        offset: int = 0,
        limits: list[int] | None = None,
        schema: dict[str, Any] | None = None,
    ) -> None:
        self.sock = sock
        self.constrained = constrained
        self.schema = schema
        self.offset = offset
        self.limits = limits
        self.count = 0

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[None]:
        yield None

    async def request(self, _: None, prompt: str, tokens: int) -> Reply:
        from mlxd.client import AsyncClient

        fields: dict[str, Any] = {"cache": False}
        k, self.count = self.count, self.count + 1  # before any await: k is the client's
        if self.constrained:
            schema = self.schema or SCHEMAS[NAMES[(k + self.offset) % len(NAMES)]]
            fields["format"] = fmt(schema)
        if self.limits is not None:
            tokens = self.limits[k]
        start = time.perf_counter()
        async with AsyncClient(self.sock, name="bench-structured") as client:
            reply = await mlxd_request(client, prompt, tokens, **fields)
        reply.sent_at = start
        return reply


def decode(loop: Loop) -> dict[str, Any]:
    """A loop's decode figures, from its replies' first and last tokens."""
    replies = [r for r in loop.replies if r.first_at is not None and r.last_at is not None]
    first = min(r.first_at for r in replies)  # type: ignore[type-var]
    last = max(r.last_at for r in replies)  # type: ignore[type-var]
    decoded = sum(r.tokens - 1 for r in replies)
    return {
        "aggregate_tps": decoded / (last - first) if last > first else 0.0,
        "tokens_per_request": statistics.mean(r.tokens for r in loop.replies),
        "finish": {k: sum(r.finish_reason == k for r in loop.replies) for k in ("stop", "length")},
        "wall_s": loop.wall_s,
        "texts": [r.text for r in loop.replies],
        "tokens": [r.tokens for r in loop.replies],
    }


def check_outputs(texts: list[str], offset: int) -> int:
    """How many constrained outputs validate against their schemas (see ``Requests``)."""
    import jsonschema

    valid = 0
    for k, text in enumerate(texts):
        with contextlib.suppress(ValueError, jsonschema.ValidationError):
            jsonschema.validate(json.loads(text), SCHEMAS[NAMES[(k + offset) % len(NAMES)]])
            valid += 1
    return valid


def throughput(sock: Path, prompts: Prompts, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    warm = [[prompts.short()] for _ in range(max(args.clients))]
    for backend in (
        Requests(sock, False),
        Requests(sock, True),
        Requests(sock, True, schema=RECORDS),
    ):
        run(closed_loop(backend, warm, 8))  # first-use costs, and every schema's compile
    for n in args.clients:
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in LOOPS}
        for r in range(args.rounds):
            per_client = [[prompts.short()] for _ in range(n)]
            for name in rotate(("free", "long"), r):
                backend = Requests(sock, name == "long", schema=RECORDS)
                rounds[name].append(decode(run(closed_loop(backend, per_client, args.tokens))))
            # The schemas rotate by round too: with one client, each gets its turn.
            backend = Requests(sock, True, offset=r)
            rounds["constrained"].append(decode(run(closed_loop(backend, per_client, args.tokens))))
            # Free again, each request as long as its constrained twin: the same batch
            # sizes step by step, so what is left of the difference is the masks' cost.
            backend = Requests(sock, False, limits=rounds["constrained"][-1]["tokens"])
            rounds["matched"].append(decode(run(closed_loop(backend, per_client, args.tokens))))

        out[str(n)] = {
            **{
                name: {
                    "aggregate_tps": statistics.median(x["aggregate_tps"] for x in rs),
                    "tokens_per_request": statistics.median(x["tokens_per_request"] for x in rs),
                    "finish_stop": sum(x["finish"]["stop"] for x in rs),
                    "finish_length": sum(x["finish"]["length"] for x in rs),
                    "rounds": [{k: v for k, v in x.items() if k != "texts"} for x in rs],
                }
                for name, rs in rounds.items()
            },
            "ratio_long": statistics.median(ratios(rounds, "long", "free")),
            "ratios_long": ratios(rounds, "long", "free"),
            "ratio": statistics.median(ratios(rounds, "constrained", "free")),
            "ratios": ratios(rounds, "constrained", "free"),
            "ratio_matched": statistics.median(ratios(rounds, "constrained", "matched")),
            "ratios_matched": ratios(rounds, "constrained", "matched"),
            "constrained_valid": sum(
                check_outputs(c["texts"], r) for r, c in enumerate(rounds["constrained"])
            ),
            "requests": n * args.rounds,
        }
    return out


LOOPS = ("free", "long", "constrained", "matched")


def ratios(rounds: dict[str, list[dict[str, Any]]], over: str, of: str) -> list[float]:
    """Each round's ``over`` aggregate decode tokens/s over its ``of`` one's."""
    return [
        c["aggregate_tps"] / f["aggregate_tps"]
        for f, c in zip(rounds[of], rounds[over], strict=True)
    ]


def verdict(result: dict[str, Any]) -> str:
    top = result["throughput"].get("16")
    if top is None:
        return "n/a (16 not among --clients)"
    ratio = top["ratio_long"]
    return f"{ratio:.2f}x {'PASS' if ratio >= TARGET else 'MISS'}"


def print_table(result: dict[str, Any]) -> None:
    tput = result["throughput"]
    print(f"\nstructured output ({result['blas']} BLAS, {result['rounds']} rounds, "
          f"max_tokens {result['tokens']}; medians)")  # fmt: skip
    print("headline, equal lengths: free vs a schema no output completes (both decode "
          "max_tokens)")  # fmt: skip
    print(f"{'seqs':<6}{'free tok/s':>11}{'constr tok/s':>13}{'constr/free':>12}"
          f"{'rounds min-max':>16}{'free tok/req':>13}{'constr tok/req':>15}")  # fmt: skip
    for n, t in tput.items():
        f, c, rs = t["free"], t["long"], t["ratios_long"]
        print(f"{n:<6}{f['aggregate_tps']:>11.1f}{c['aggregate_tps']:>13.1f}"
              f"{t['ratio_long']:>11.2f}x{min(rs):>9.2f}-{max(rs):.2f}"
              f"{f['tokens_per_request']:>13.1f}{c['tokens_per_request']:>15.1f}")  # fmt: skip
    if any(t[k]["finish_stop"] for t in tput.values() for k in ("free", "long")):
        print("WARNING: some headline requests ended before max_tokens (lengths unequal)")
    print(f"target: constrained >= {TARGET:.2f}x free at 16 sequences (a constraint costs "
          f"<= {1 - TARGET:.0%} of decode throughput): {verdict(result)}")  # fmt: skip
    print("\nsecondary, natural lengths: schemas that finish (constrained outputs end early)")
    print(f"{'seqs':<6}{'constr tok/s':>13}{'constr/free':>12}{'matched tok/s':>14}"
          f"{'constr/matched':>15}{'constr tok/req':>15}{'stop':>7}{'valid':>7}")  # fmt: skip
    for n, t in tput.items():
        c, m, total = t["constrained"], t["matched"], t["requests"]
        print(f"{n:<6}{c['aggregate_tps']:>13.1f}{t['ratio']:>11.2f}x"
              f"{m['aggregate_tps']:>14.1f}{t['ratio_matched']:>14.2f}x"
              f"{c['tokens_per_request']:>15.1f}{c['finish_stop']:>4}/{total:<2}"
              f"{t['constrained_valid']:>4}/{total:<2}")  # fmt: skip
    print("(constr/free: over the headline's free; matched: free requests each as long as "
          "its constrained twin; stop: outputs that ended with their value; valid: parse "
          "and validate)")  # fmt: skip
    print(f"\n{'schema compile, ms':<40}{'llguidance':>12}{'1st mask':>10}{'daemon':>10}"
          f"{'1st TTFT':>10}{'again':>8}")  # fmt: skip
    local, daemon = result["compile"]["in_process"], result["compile"]["daemon"]
    for name in local["schemas"]:
        a, d = local["schemas"][name], daemon[name]
        print(f"{name:<40}{a['compile_ms']:>12.2f}{a['first_mask_ms']:>10.2f}"
              f"{d['compile_ms']:>10.1f}{d['first_ttft_ms']:>10.1f}"
              f"{d['again_ttft_ms']:>8.1f}")  # fmt: skip
    print(f"(llguidance tokenizer built once per model: {local['tokenizer_ms']:.1f} ms)")


def figures(result: dict[str, Any]) -> list[blas_regime.Figure]:
    rows: list[blas_regime.Figure] = []
    for n, t in result["throughput"].items():
        rows.append((f"{n} seq: free decode tok/s", t["free"]["aggregate_tps"]))
        rows.append((f"{n} seq: constrained (equal length) tok/s", t["long"]["aggregate_tps"]))
        rows.append((f"{n} seq: constrained / free (equal length)", t["ratio_long"]))
        rows.append((f"{n} seq: natural-length constrained / free", t["ratio"]))
        rows.append((f"{n} seq: natural-length constrained / matched", t["ratio_matched"]))
    rows.append(("target: constrained/free at 16 seq", verdict(result)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds of the 4 loops per N")
    parser.add_argument("--tokens", type=int, default=96, help="max_tokens of every request")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--compile-repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 48 tokens")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "structured.json"))
    blas_regime.add_argument(parser, default=blas_regime.openblas_or_reference())
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = 3, 48
    regime = blas_regime.child_regime()
    if regime is None:
        blas_regime.run_regimes(args.blas, Path(args.out), "structured", figures)
        return
    began = time.perf_counter()
    load_start = os.getloadavg()
    measured = revision()

    import mlx.core as mx
    from mlx_lm import load

    from mlxd.daemon.demo_model import build_demo_model

    work = Path(tempfile.mkdtemp(prefix="mlxd-bench-", dir="/tmp"))
    model_dir = build_demo_model(work / MODEL, size=MODEL)
    _, tokenizer = load(str(model_dir))
    prompts = Prompts(tokenizer)
    daemon = None
    try:
        daemon, sock = start_mlxd(work, model_dir, MODEL)
        wait_mlxd(sock, daemon)
        blas_regime.check_process(daemon.pid, regime, "mlxd")
        print("throughput ...", flush=True)
        tput = throughput(sock, prompts, args)
        print("compile, on the daemon ...", flush=True)
        on_daemon = compile_on_daemon(sock, prompts, ALL_SCHEMAS, args.compile_repeats)
    finally:
        stop(daemon)
    print("compile, in process ...", flush=True)
    local = compile_in_process(model_dir, ALL_SCHEMAS, args.compile_repeats)
    result: dict[str, Any] = {
        "benchmark": "structured",
        "blas": regime,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "clients": args.clients,
        "target": {
            "ratio": TARGET,
            "sequences": 16,
            "what": "long/free aggregate decode tok/s at equal lengths (both max_tokens)",
        },
        "throughput": tput,
        "compile": {"in_process": local, "daemon": on_daemon},
        "schemas": ALL_SCHEMAS,
        "prompt_tokens": prompts.lengths,
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "mlx": mx.__version__,
        "mlxd_revision": measured,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    result["verdict"] = verdict(result)
    result["run_s"] = time.perf_counter() - began
    print_table(result)
    print(f"\nwhole run {result['run_s']:.0f} s; load average {load_start} -> "
          f"{result['load_average_end']}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
