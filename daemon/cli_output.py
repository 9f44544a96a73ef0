"""The CLI's human-readable output: byte sizes, durations and the ``mlxd stats`` summary.

What scripts read is ``--json``, which prints the protocol's own structs as they are; this
module is only for people, so its layout may change. Sizes are binary (KiB, MiB, GiB) as
the protocol's byte counts are.

Threading: pure functions; the CLI's main thread.
"""

from __future__ import annotations

from typing import Any

from mlxd.protocol import Done, ServerStats


def human_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``12.0 MiB``, ``2.4 GiB``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def human_duration(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``, ``3 d 4 h``."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def done_summary(done: Done) -> str:
    """``generate --verbose``: ``64 tokens in 0.31 s (230.1 tokens/s), first after 0.02 s;
    prompt 5 tokens, 0 cached; finish: length``."""
    parts = []
    u, t = done.usage, done.timings
    if u is not None and t is not None:
        parts.append(
            f"{u.completion_tokens} tokens in {t.total_s:.2f} s ({t.tokens_per_s:.1f} tokens/s), "
            f"first after {t.ttft_s:.2f} s"
        )
    if u is not None:
        parts.append(f"prompt {u.prompt_tokens} tokens, {u.cached_tokens} cached")
    if done.speculative is not None:
        sp = done.speculative
        parts.append(f"{sp.mode}: {sp.accepted} of {sp.drafted} drafted tokens accepted")
    if done.finish_reason is not None:
        parts.append(f"finish: {done.finish_reason}")
    return "; ".join(parts)


def stats_summary(s: ServerStats) -> str:
    """``mlxd stats`` for a person: one topic a line, sizes in MiB/GiB, rates as shares."""
    health = "alive" if s.worker_alive else "DEAD"
    mean_batch = f", mean batch {s.tokens_generated / s.decode_steps:.1f}" if s.decode_steps else ""
    rows: list[tuple[str, str]] = [
        ("daemon", f"up {human_duration(s.uptime_s)}, worker {health}, "
                   f"{s.connections} connection{'s' if s.connections != 1 else ''}"),
        ("requests", f"{s.requests_total} total: {s.requests_in_flight} in flight "
                     f"(this one included), {s.requests_completed} completed, "
                     f"{s.requests_cancelled} cancelled, {s.requests_failed} failed"),
        ("sequences", f"{s.active_sequences} running, {s.queued} queued, "
                      f"{s.sequences_preempted} preempted"),
        ("tokens", f"{s.tokens_generated} generated in {s.decode_steps} decode steps"
                   f"{mean_batch}; {s.prompt_tokens_processed} prompt tokens computed"),
    ]  # fmt: skip
    if s.tokens_drafted:
        rows.append(("speculative", f"{s.tokens_accepted} of {s.tokens_drafted} drafted tokens "
                                    "accepted"))  # fmt: skip
    m = s.memory
    if m is not None:
        rows += [
            ("memory", f"{human_bytes(m.used_bytes)} used of {human_bytes(m.usable_bytes)} "
                       f"usable (budget {human_bytes(m.budget_bytes)}), "
                       f"peak {human_bytes(m.peak_used_bytes)}"),
            ("", f"weights {human_bytes(m.weights_bytes)}, live KV "
                 f"{human_bytes(m.live_kv_bytes)}, scratch {human_bytes(m.scratch_bytes)}, "
                 f"cached KV {human_bytes(m.cached_kv_bytes)} "
                 f"(pinned {human_bytes(m.pinned_kv_bytes)})"),
            ("", f"MLX: {human_bytes(m.mlx_active_bytes)} active, peak "
                 f"{human_bytes(m.mlx_peak_bytes)}, buffer cache {human_bytes(m.mlx_cache_bytes)}"),
            ("", f"to make room: {m.evicted_entries} cache entries evicted, "
                 f"{m.unloaded_models} models unloaded"),
        ]  # fmt: skip
    c = s.cache
    if c is not None:
        lookups = sum(c.hits.values())
        found = lookups - c.hits.get("miss", 0)
        kinds = ", ".join(f"{kind} {n}" for kind, n in c.hits.items())
        prompt = c.tokens_reused + c.tokens_processed
        rows += [
            ("prompt cache", f"{c.entries} entries, {human_bytes(c.bytes)} of "
                             f"{human_bytes(c.max_bytes)}; hit rate {_share(found, lookups)} "
                             f"of {lookups} lookups ({kinds})"),
            ("", f"{c.tokens_reused} of {prompt} prompt tokens reused "
                 f"({_share(c.tokens_reused, prompt)}); {c.evictions} evictions, "
                 f"{c.forks} forks"),
        ]  # fmt: skip
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{text}" for label, text in rows]
    lines += _per_model(s, width)
    return "\n".join(lines)


def _per_model(s: ServerStats, indent: int) -> list[str]:
    """A table of each model's share: weights, live KV, scratch, cached KV."""
    split: dict[str, dict[str, int]] = {}
    if s.memory is not None:
        for name, part in s.memory.by_model.items():
            split[name] = {
                "weights": part.weights,
                "live KV": part.live_kv,
                "scratch": part.scratch,
                "cached KV": part.cached_kv,
            }
    if s.cache is not None:  # a model can have cached entries and no memory split yet
        for name, n in s.cache.bytes_by_model.items():
            split.setdefault(name, {}).setdefault("cached KV", n)
    if not split:
        return [f"{'per model':<{indent}}no model resident or cached"]
    columns = ("weights", "live KV", "scratch", "cached KV")
    name_width = max(len("model"), *(len(n) for n in split))
    cell = 12

    def row(first: str, cells: list[Any]) -> str:
        return f"{first:<{name_width}}" + "".join(f"{c:>{cell}}" for c in cells)

    table = [row("model", list(columns))]
    for name in sorted(split):
        table.append(row(name, [human_bytes(split[name].get(col, 0)) for col in columns]))
    label = "per model"
    return [f"{label if i == 0 else '':<{indent}}{line}" for i, line in enumerate(table)]
