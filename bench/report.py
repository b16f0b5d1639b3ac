"""The issue's goals, checked against the figures, and the printed table."""

from __future__ import annotations

import operator
from typing import Any

# (benchmark, key, comparison, target, how the goal reads, note)
GOALS: list[tuple[str, str, str, Any, str, str]] = [
    ("reconcile", "overhead_vs_floor", "<=", 1.25, "<= 1.25", "at 2,000 rooms"),
    ("reconcile", "speedup", ">=", 1.5, ">= 1.5", "at 2,000 rooms"),
    ("reconcile", "second_run_writes", "==", 0, "= 0", ""),
    ("reconcile", "seconds_100k", "<", 30, "< 30 s", ""),
    ("reconcile", "peak_rss_mb_100k", "<", 500, "< 500 MB", ""),
    ("reconcile", "growth_ratio", "<=", 12, "<= 12 for 10x rooms", ""),
    ("latency", "overhead_p50_ms", "<=", 10, "<= 10 ms", ""),
    ("burst", "answered", "==", "messages", "= messages (100%)", ""),
    ("burst", "in_order", "==", True, "true", ""),
    ("burst", "duplicates", "==", 0, "= 0", ""),
    ("provision", "p50_s", "<=", 1.5, "<= 1.5 s", ""),
    ("provision", "duplicates", "==", 0, "= 0", ""),
]
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, "==": operator.eq}

# What the table shows for each benchmark, in order (the keys, then a few more).
SHOWN = {
    "reconcile": [
        ("rooms", ""), ("seconds", "s"), ("wall_seconds", "s"), ("naive_seconds", "s"),
        ("speedup", "x"), ("hs_floor_seconds", "s"), ("hs_floor_method", ""),
        ("overhead_vs_floor", "x"), ("requests", ""), ("naive_requests", ""),
        ("second_run_writes", ""), ("seconds_cold", "s"), ("naive_seconds_cold", "s"),
        ("seconds_1k", "s"), ("seconds_10k", "s"), ("seconds_100k", "s"),
        ("peak_rss_mb_10k", "MB"), ("peak_rss_mb_100k", "MB"), ("growth_ratio", "x"),
        ("growth_rooms_ratio", "x rooms"),
    ],
    "latency": [
        ("samples", ""), ("bot_p50_ms", "ms"), ("bot_p99_ms", "ms"), ("raw_p50_ms", "ms"),
        ("raw_p99_ms", "ms"), ("overhead_p50_ms", "ms"),
    ],
    "burst": [
        ("messages", ""), ("answered", ""), ("in_order", ""), ("seconds", "s"),
        ("msgs_per_s", "/s"), ("duplicates", ""),
    ],
    "provision": [("users", ""), ("p50_s", "s"), ("p95_s", "s"), ("duplicates", "")],
    "stream_cpu": [
        ("cpu_s_10k", "CPU-s"), ("cpu_s_12k", "CPU-s"), ("edits_10k", ""), ("edits_12k", ""),
    ],
}  # fmt: skip


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for bench, key, op, target, reads, note in GOALS:
        data = results.get(bench) or {}
        value = data.get(key)
        goal_target = data.get(target) if isinstance(target, str) else target
        measured = value is not None and goal_target is not None  # else not run this time
        passed = bool(OPS[op](value, goal_target)) if measured else None
        out.append(
            {"benchmark": bench, "key": key, "goal": reads, "value": value, "pass": passed,
             "note": note}
        )  # fmt: skip
    return out


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:.1f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def table(results: dict[str, Any]) -> str:
    goals = {(g["benchmark"], g["key"]): g for g in results.get("goals", [])}
    rows = [("benchmark", "figure", "measured", "goal", "")]
    for bench, keys in SHOWN.items():
        data = results.get(bench)
        if not data:
            continue
        first = True
        for key, unit in keys:
            if key not in data and (bench, key) not in goals:
                continue
            goal = goals.get((bench, key))
            mark = ""
            reads = ""
            if goal:
                reads = goal["goal"] + (f" ({goal['note']})" if goal["note"] else "")
                mark = {True: "pass", False: "MISS", None: "n/a"}[goal["pass"]]
            rows.append((bench if first else "", key, _fmt(data.get(key), unit), reads, mark))
            first = False
        if "error" in data:
            rows.append(("", "error", str(data["error"])[:60], "", "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    meta = results.get("meta", {})
    lines.append(
        f"\n{meta.get('mode')} run, {meta.get('seconds')} s; {meta.get('cpus')} CPUs; Synapse "
        f"{meta.get('synapse')}, maubot {meta.get('maubot')}, plugin db {meta.get('plugin_db_engine')};"
        f" commit {meta.get('git_commit')}{' (plugin modified)' if meta.get('git_dirty') else ''}"
    )
    missed = [g for g in results.get("goals", []) if g["pass"] is False]
    if missed:
        lines.append("goals missed: " + ", ".join(f"{g['benchmark']}.{g['key']}" for g in missed))
    return "\n".join(lines)
