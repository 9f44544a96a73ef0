"""The tables of bench/concurrency.py: its measurements summarised (the ratios, the
targets' verdicts), printed per BLAS regime, and its key figures for the regimes' side by
side (bench/blas_regime.py). Nothing here measures.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import blas_regime

from clients import Loop, Reply, percentile, pooled

TARGETS = {
    # Issue 4: against mlx_lm's server.
    "aggregate_tps_16": 1.5,  # mlxd / mlx_lm server, at least
    "p99_ttft_16": 0.5,  # mlxd / mlx_lm server, at most
    "single_stream": 0.95,  # mlxd / in-process, at least
    # Issue 16: against the in-process limit, at every N.
    "limit_aggregate_tps": 0.95,  # mlxd / in-process, at least
    "limit_p99_ttft": 1.1,  # mlxd / in-process, at most
    "limit_single_stream": 0.97,  # mlxd / in-process, at least
}
CONTESTANTS = ("in_process", "mlx_lm", "mlxd")
NAMES = {"in_process": "mlx-lm in-process", "mlx_lm": "mlx_lm server", "mlxd": "mlxd"}
LOOP_NAMES = {"in_process": "BatchGenerator", "mlx_lm": "mlx_lm server", "mlxd": "mlxd"}


def summarise(
    args: argparse.Namespace,
    *,
    singles: dict[str, list[Reply]],
    loops: dict[str, dict[int, list[Loop]]],
    typing: dict[str, list[Reply]],
    mem: dict[str, dict[str, int]],
) -> dict[str, Any]:
    single_out: dict[str, Any] = {}
    for name, replies in singles.items():
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
        row: dict[str, Any] = {name: pooled(loops[name][n], each="rounds") for name in CONTESTANTS}
        for name in CONTESTANTS:
            ends = {r.finish_reason or "?" for lp in loops[name][n] for r in lp.replies}
            row[name]["finish_reasons"] = sorted(ends)
        for a, b in (("mlxd", "mlx_lm"), ("mlxd", "in_process"), ("mlx_lm", "in_process")):
            ea, eb = row[a], row[b]
            row[f"{a}/{b}"] = {
                "aggregate": ea["aggregate_tps"] / eb["aggregate_tps"],
                "ttft_p99": ea["ttft_p99_s"] / eb["ttft_p99_s"],
                "aggregate_rounds": [
                    x / y
                    for x, y in zip(
                        ea["aggregate_tps_rounds"], eb["aggregate_tps_rounds"], strict=True
                    )
                ],
            }
        # The same prompts, all greedy: the texts should match (a check, not a measurement).
        each = [[r.text for lp in loops[name][n] for r in lp.replies] for name in CONTESTANTS]
        row["same_text"] = sum(len(set(texts)) == 1 for texts in zip(*each, strict=True))
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

    targets: list[dict[str, Any]] = []

    def check(key: str, at: str, issue: int, what: str, value: float) -> None:
        """``what``: the check, "{}" where the target goes ("... >= {}x ..." or "<= {}x")."""
        target = TARGETS[key]
        met = value >= target if ">=" in what else value <= target
        verdict = "PASS" if met else "MISS"
        targets.append({"key": key + at, "issue": issue, "label": what.format(target),
                        "value": value, "target": target, "verdict": verdict})  # fmt: skip

    single_ratio = single_out["mlxd"]["ratio_to_in_process"]
    if "16" in conc:
        ratios = conc["16"]["mlxd/mlx_lm"]
        check("aggregate_tps_16", "", 4, "mlxd agg tok/s @16 >= {}x mlx_lm", ratios["aggregate"])
        check("p99_ttft_16", "", 4, "mlxd p99 TTFT @16 <= {}x mlx_lm", ratios["ttft_p99"])
    check("single_stream", "", 4, "mlxd single stream >= {}x in-process", single_ratio)
    for n, row in conc.items():
        ratios = row["mlxd/in_process"]
        agg, ttft = ratios["aggregate"], ratios["ttft_p99"]
        check("limit_aggregate_tps", f"_{n}", 16, f"mlxd agg tok/s @{n} >= {{}}x limit", agg)
        check("limit_p99_ttft", f"_{n}", 16, f"mlxd p99 TTFT @{n} <= {{}}x limit", ttft)
    check("limit_single_stream", "", 16, "mlxd single stream >= {}x in-process", single_ratio)
    return {
        "benchmark": "concurrency",
        "trials": args.trials,
        "rounds": args.rounds,
        "requests": args.requests,
        "largest_clients": max(args.clients),
        "single_stream": single_out,
        "concurrency": conc,
        "typing_ttft": typing_out,
        "peak_memory": mem,
        "targets": targets,
        "verdicts": {t["key"]: t["verdict"] for t in targets},
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def print_table(res: dict[str, Any]) -> None:
    m, lengths = res["model"], res["prompt_tokens"]
    print(
        f"\nconcurrency: {m['size']} model ({m['layers']} layers x {m['hidden']}), "
        f"{res['cpus']} CPUs, mlx {res['mlx']}, mlx-lm {res['mlx_lm']}, BLAS {res['blas']}; "
        f"load {res['load_average_start'][0]:.2f} -> {res['load_average_end'][0]:.2f}"
    )
    print(
        f"\n1. single-stream decode, greedy, {res['single_tokens']} tokens, "
        f"{min(lengths['single'])}-{max(lengths['single'])}-token prompts, "
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
        f"\n2. closed loop: each client {res['requests']} requests back to back, "
        f"{min(lengths['loop'])}-{max(lengths['loop'])}-token prompts, all distinct, "
        f"{res['loop_tokens']} tokens each, greedy, no prompt cache, a new connection per "
        f"request; {res['rounds']} rounds; TTFT client side, p99 = max below 100 samples"
    )
    print(
        f"{'clients':<9}{'':<16}{'agg tok/s':>11}{'TTFT p50':>12}{'TTFT p99':>12}{'mean batch':>12}"
    )
    for n, row in res["concurrency"].items():
        for name in CONTESTANTS:
            e = row[name]
            batch = f"{e['mean_batch']:.1f}" if "mean_batch" in e else "-"
            line = (
                f"{n:<9}{LOOP_NAMES[name]:<16}{e['aggregate_tps']:>11.1f}"
                f"{_ms(e['ttft_p50_s']):>12}{_ms(e['ttft_p99_s']):>12}{batch:>12}"
            )
            if name == "mlxd":
                line += f"   (same text {row['same_text']}/{e['requests']})"
            print(line)
    print("\n   ratios of agg tok/s and of p99 TTFT (limit: the in-process BatchGenerator)")
    pairs = ("mlxd/in_process", "mlx_lm/in_process", "mlxd/mlx_lm")
    print(f"{'clients':<9}" + "".join(f"{p.replace('in_process', 'limit'):>24}" for p in pairs))
    for n, row in res["concurrency"].items():
        cells = [f"{row[p]['aggregate']:.2f}x, {row[p]['ttft_p99']:.2f}x" for p in pairs]
        print(f"{n:<9}" + "".join(f"{c:>24}" for c in cells))

    t = res["typing"]
    print(
        f"\n3. typing: {t['steps']} steps of {t['step_chars']} chars x {t['sessions']} "
        f"sessions on a {lengths['typing_base'][0]}-token file, {t['max_tokens']} tokens per "
        "step, each cancelling the previous; mlxd prompt cache ON"
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

    p, top = res["worker_profile"], str(res["worker_profile"]["clients"])
    s, loop = p["summary"], p["loop"]
    print(
        f"\n4b. worker profile at {top} clients: a second mlxd (MLXD_PROFILE_ROUNDS), one closed "
        f"loop of workload 2 after a warm-up ({p['warm_up_rounds']} rounds, left out); "
        f"{loop['aggregate_tps']:.1f} agg tok/s, p99 TTFT {_ms(loop['ttft_p99_s'])} "
        f"(same text as workload 2: {p['same_text']}/{p['requests']})"
    )
    print(
        f"{'rounds':>8}{'passes/round':>14}{'seqs/round':>12}{'round ms':>10}"
        f"{'generator ms/tok':>18}{'worker Python µs/tok':>22}{'cpu share':>11}"
    )
    print(
        f"{s['rounds']:>8}{s['passes_per_round']:>14.2f}{s['sequences_per_round']:>12.1f}"
        f"{s['round_s'] * 1e3:>10.2f}{s['generator_s_per_token'] * 1e3:>18.3f}"
        f"{s['worker_python_s_per_token'] * 1e6:>22.1f}{s['cpu_share']:>11.2f}"
    )
    if top in res["concurrency"]:
        limit = res["concurrency"][top]["in_process"]
        per_token = limit["wall_s"] / limit["tokens"]
        print(
            f"(the limit at {top} clients, workload 2: {per_token * 1e3:.3f} ms/tok of wall "
            f"time, {limit['mean_batch']:.1f} tokens per step)"
        )

    for issue in (4, 16):
        print(f"\ntargets (issue {issue})")
        for t in res["targets"]:
            if t["issue"] == issue:
                print(f"  {t['label']:<44}{t['value']:>7.2f}x  {t['verdict']}")


def figures(res: dict[str, Any]) -> list[blas_regime.Figure]:
    """The rows of the BLAS regimes' side-by-side table."""
    rows: list[blas_regime.Figure] = [
        (f"1. single stream tok/s, {NAMES[name]}", e["decode_tps"])
        for name, e in res["single_stream"].items()
    ]
    for n, row in res["concurrency"].items():
        for name in CONTESTANTS:
            e = row[name]
            rows.append((f"2. {n} clients agg tok/s, {LOOP_NAMES[name]}", e["aggregate_tps"]))
        for name in CONTESTANTS:
            e = row[name]
            rows.append((f"2. {n} clients p99 TTFT ms, {LOOP_NAMES[name]}", e["ttft_p99_s"] * 1e3))
        for pair in ("mlxd/in_process", "mlx_lm/in_process"):
            label = pair.replace("in_process", "limit")
            rows.append((f"2. {n} clients agg, {label}", row[pair]["aggregate"]))
            rows.append((f"2. {n} clients p99 TTFT, {label}", row[pair]["ttft_p99"]))
    for name, e in res["typing_ttft"].items():
        rows.append((f"3. typing TTFT median ms, {NAMES[name]}", e["ttft_median_s"] * 1e3))
    for name, e in res["peak_memory"].items():
        rows.append((f"4. peak memory MiB, {NAMES[name]}", e.get("VmHWM", 0) / 2**20))
    s = res["worker_profile"]["summary"]
    rows += [
        ("4b. profile: passes per round", s["passes_per_round"]),
        ("4b. profile: sequences per round", s["sequences_per_round"]),
        ("4b. profile: round ms", s["round_s"] * 1e3),
        ("4b. profile: generator ms per token", s["generator_s_per_token"] * 1e3),
        ("4b. profile: worker Python µs per token", s["worker_python_s_per_token"] * 1e6),
        ("4b. profile: cpu share", s["cpu_share"]),
    ]
    for t in res["targets"]:  # "#16 mlxd ...": issue 16's target
        rows.append((f"#{t['issue']} {t['label']}", f"{t['value']:.2f}x {t['verdict']}"))
    return rows
