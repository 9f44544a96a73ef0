"""Structured output's cost: mlxd's decode tokens/s with and without a JSON-schema
constraint (``Generate.format``) at 1 and 16 concurrent sequences, and what compiling a
schema costs, on the "small" demo model (random weights), in one run (issue 17).

Decode throughput: N clients (``--clients``, 1 and 16) each send one streamed request at
once (a new ``AsyncClient`` per request, ``cache=False``, greedy, the same distinct 30-60
token prompts and ``max_tokens`` both ways). Free requests have no ``format``; constrained
ones carry ``{"type": "json_schema", "schema": ...}``, client i in round r getting schema
``(i + r) % len(SCHEMAS)``: closed objects (``additionalProperties: false``, required fields) of
enums, bounded integers and numbers, bounded arrays and a nested object, so that outputs
finish on random weights. A constrained output may end early (the value is complete, so
EOS), so tokens/s counts the tokens actually produced: aggregate decode tokens/s = all
completion tokens but each request's first / (the last token's arrival - the first
token's), on the client's side. Tokens per request are reported too: a constrained batch
that empties early runs its tail at a smaller batch, which lowers its aggregate. Each of
``--rounds`` rounds runs free and constrained on that round's prompts, who goes first
alternating, and then "matched": free again, each request's ``max_tokens`` the number of
tokens its constrained twin produced, so that the batch shrinks step by step as the
constrained one's did and what is left of the difference is the masks' own cost. The table
shows medians over rounds and the medians of the rounds' own ratios.

Schema compile time, two ways: (a) in this process, llguidance compiling each schema for
the same tokenizer the daemon builds (daemon/constraints.py: ``grammar_from_json_schema``,
then ``LLMatcher``), and its first mask, in ms; (b) on the daemon, a request
(``max_tokens`` 1) with a schema it has not seen (each made new by a ``description``) vs
the same schema again, time to first token; the difference is the daemon's compile.

Target (issue 17), printed PASS or MISS: at 16 sequences, the constrained aggregate decode
tokens/s is at least 0.90x the free one's.

``--blas reference|openblas|both``: the BLAS MLX multiplies with, here and in the daemon
(bench/blas_regime.py); the default is ``openblas`` where it is installed (issue 12's
regime, the one the target is set in), else ``reference``.

    python bench/structured.py [--rounds 9] [--tokens 96] [--clients 1 16] [--quick]
                               [--blas reference|openblas|both]

Prints a table and writes bench/results/structured.json. ``--quick`` (3 rounds, 48
tokens) takes about 20 s on 2 x86 cores, the defaults about a minute (per regime).
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

from clients import MODEL, Loop, Prompts, Reply, closed_loop, mlxd_request, rotate, run

TARGET = 0.90  # constrained / free aggregate decode tokens/s at 16 sequences, at least


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required if required is not None else sorted(properties),
        "additionalProperties": False,
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "person (enum, integer, array)": _closed(
        {
            "name": {"enum": ["ada", "alan", "grace"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        },
        ["name", "age"],
    ),
    "order (nested object, bounded array)": _closed(
        {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "customer": _closed(
                {
                    "tier": {"enum": ["free", "pro", "team"]},
                    "active": {"type": "boolean"},
                }
            ),
            "items": {
                "type": "array",
                "items": _closed(
                    {
                        "sku": {"enum": ["a1", "b2", "c3", "d4"]},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    }
                ),
                "minItems": 1,
                "maxItems": 3,
            },
        }
    ),
    "reading (bounded numbers)": _closed(
        {
            "sensor": {"enum": ["temp", "humidity", "pressure"]},
            "value": {"type": "number", "minimum": -40, "maximum": 60},
            "quality": {"type": "integer", "minimum": 0, "maximum": 5},
            "calibrated": {"type": "boolean"},
        }
    ),
    "config (enums)": _closed(
        {
            "mode": {"enum": ["fast", "safe", "debug"]},
            "level": {"enum": [1, 2, 3]},
            "color": {"enum": ["red", "green", "blue", "none"]},
            "retries": {"type": "integer", "minimum": 0, "maximum": 5},
        }
    ),
}
NAMES = list(SCHEMAS)


def fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "schema": schema}


class Requests:
    """mlxd, a new ``AsyncClient`` per request, ``cache=False``; constrained: request k of
    the loop carries schema ``(k + offset) % len(SCHEMAS)``; ``limits``: request k's
    ``max_tokens`` is ``limits[k]`` rather than the loop's."""

    def __init__(
        self, sock: Path, constrained: bool, offset: int = 0, limits: list[int] | None = None
    ) -> None:
        self.sock = sock
        self.constrained = constrained
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
            fields["format"] = fmt(SCHEMAS[NAMES[(k + self.offset) % len(NAMES)]])
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
    for constrained in (False, True):  # first-use costs, and every schema's compile
        run(closed_loop(Requests(sock, constrained), warm, 8))
    for n in args.clients:
        rounds: dict[str, list[dict[str, Any]]] = {"free": [], "constrained": [], "matched": []}
        for r in range(args.rounds):
            per_client = [[prompts.short()] for _ in range(n)]
            for name in rotate(("free", "constrained"), r):
                # The schemas rotate by round too: with one client, each gets its turn.
                backend = Requests(sock, name == "constrained", offset=r)
                rounds[name].append(decode(run(closed_loop(backend, per_client, args.tokens))))
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
            "ratio": statistics.median(ratios(rounds, "free")),
            "ratios": ratios(rounds, "free"),
            "ratio_matched": statistics.median(ratios(rounds, "matched")),
            "ratios_matched": ratios(rounds, "matched"),
            "constrained_valid": sum(
                check_outputs(c["texts"], r) for r, c in enumerate(rounds["constrained"])
            ),
            "constrained_requests": n * args.rounds,
        }
    return out


def ratios(rounds: dict[str, list[dict[str, Any]]], of: str) -> list[float]:
    """Each round's constrained aggregate decode tokens/s over its ``of`` one's."""
    return [
        c["aggregate_tps"] / f["aggregate_tps"]
        for f, c in zip(rounds[of], rounds["constrained"], strict=True)
    ]


def compile_in_process(model_dir: Path, repeats: int) -> dict[str, Any]:
    """llguidance compiling each schema for the daemon's tokenizer, as constraints.py does."""
    import llguidance
    import llguidance.hf
    import numpy as np
    from mlx_lm import load

    from mlxd.daemon.constraints import _JSON_OPTIONS

    _, tokenizer = load(str(model_dir))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(
        tokenizer._tokenizer, n_vocab=vocab, eos_token=sorted(tokenizer.eos_token_ids)
    )
    tokenizer_ms = (time.perf_counter() - start) * 1000
    out: dict[str, Any] = {"tokenizer_ms": tokenizer_ms, "schemas": {}}
    for name, schema in SCHEMAS.items():
        compiles, masks = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            text = json.dumps(schema, sort_keys=True)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
            matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
            t1 = time.perf_counter()
            assert not matcher.is_error(), matcher.get_error()
            np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
            t2 = time.perf_counter()
            compiles.append((t1 - t0) * 1000)
            masks.append((t2 - t1) * 1000)
        out["schemas"][name] = {
            "compile_ms": statistics.median(compiles),
            "first_mask_ms": statistics.median(masks),
        }
    return out


async def _ttft(sock: Path, prompt: str, schema: dict[str, Any]) -> float:
    from mlxd.client import AsyncClient

    async with AsyncClient(sock, name="bench-compile") as client:
        reply = await mlxd_request(client, prompt, 1, cache=False, format=fmt(schema))
    return reply.ttft_s


def compile_on_daemon(sock: Path, prompts: Prompts, repeats: int) -> dict[str, Any]:
    """TTFT with a schema the daemon has not seen vs the same schema again."""
    out: dict[str, Any] = {}
    tag = time.time_ns()  # new schemas even for a daemon that outlived an earlier run
    for name, schema in SCHEMAS.items():
        firsts, agains = [], []
        for i in range(repeats):
            new = {**schema, "description": f"bench {tag} {i}"}
            firsts.append(run(_ttft(sock, prompts.short(), new)))
            agains.append(run(_ttft(sock, prompts.short(), new)))
        out[name] = {
            "first_ttft_ms": statistics.median(firsts) * 1000,
            "again_ttft_ms": statistics.median(agains) * 1000,
            "compile_ms": statistics.median(a - b for a, b in zip(firsts, agains, strict=True))
            * 1000,
        }
    return out


def verdict(result: dict[str, Any]) -> str:
    top = result["throughput"].get("16")
    if top is None:
        return "n/a (16 not among --clients)"
    ratio = top["ratio"]
    return f"{ratio:.2f}x {'PASS' if ratio >= TARGET else 'MISS'}"


def print_table(result: dict[str, Any]) -> None:
    print(f"\nstructured output ({result['blas']} BLAS, {result['rounds']} rounds, "
          f"max_tokens {result['tokens']}; medians)")  # fmt: skip
    print(f"{'seqs':<6}{'free tok/s':>11}{'constr tok/s':>13}{'constr/free':>12}"
          f"{'matched tok/s':>14}{'constr/matched':>15}{'free tok/req':>13}"
          f"{'constr tok/req':>15}{'stop':>7}{'valid':>7}")  # fmt: skip
    for n, t in result["throughput"].items():
        f, c, m = t["free"], t["constrained"], t["matched"]
        total = t["constrained_requests"]
        print(f"{n:<6}{f['aggregate_tps']:>11.1f}{c['aggregate_tps']:>13.1f}{t['ratio']:>11.2f}x"
              f"{m['aggregate_tps']:>14.1f}{t['ratio_matched']:>14.2f}x"
              f"{f['tokens_per_request']:>13.1f}{c['tokens_per_request']:>15.1f}"
              f"{c['finish_stop']:>4}/{total:<2}"
              f"{t['constrained_valid']:>4}/{total:<2}")  # fmt: skip
    print("(matched: free requests each as long as its constrained twin; stop: constrained "
          "outputs that ended with their value, the rest hit max_tokens; valid: parse and "
          "validate)")  # fmt: skip
    print(f"target: constrained >= {TARGET:.2f}x free at 16 sequences: {verdict(result)}")
    print(f"\n{'schema compile, ms':<40}{'llguidance':>12}{'1st mask':>10}{'daemon':>10}"
          f"{'1st TTFT':>10}{'again':>8}")  # fmt: skip
    local, daemon = result["compile"]["in_process"], result["compile"]["daemon"]
    for name in NAMES:
        a, d = local["schemas"][name], daemon[name]
        print(f"{name:<40}{a['compile_ms']:>12.2f}{a['first_mask_ms']:>10.2f}"
              f"{d['compile_ms']:>10.1f}{d['first_ttft_ms']:>10.1f}"
              f"{d['again_ttft_ms']:>8.1f}")  # fmt: skip
    print(f"(llguidance tokenizer built once per model: {local['tokenizer_ms']:.1f} ms)")


def figures(result: dict[str, Any]) -> list[blas_regime.Figure]:
    rows: list[blas_regime.Figure] = []
    for n, t in result["throughput"].items():
        rows.append((f"{n} seq: free decode tok/s", t["free"]["aggregate_tps"]))
        rows.append((f"{n} seq: constrained decode tok/s", t["constrained"]["aggregate_tps"]))
        rows.append((f"{n} seq: constrained / free", t["ratio"]))
        rows.append((f"{n} seq: constrained / matched free", t["ratio_matched"]))
    rows.append(("target: constrained/free at 16 seq", verdict(result)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="free/constrained pairs per N")
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
        on_daemon = compile_on_daemon(sock, prompts, args.compile_repeats)
    finally:
        stop(daemon)
    print("compile, in process ...", flush=True)
    local = compile_in_process(model_dir, args.compile_repeats)
    result: dict[str, Any] = {
        "benchmark": "structured",
        "blas": regime,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "clients": args.clients,
        "target": TARGET,
        "throughput": tput,
        "compile": {"in_process": local, "daemon": on_daemon},
        "schemas": SCHEMAS,
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
