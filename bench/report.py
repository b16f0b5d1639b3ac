"""The issue's goals, checked against the figures, and the printed table."""

from __future__ import annotations

import operator
from typing import Any

# (benchmark, key, comparison, target, how the goal reads, note). A string target names
# another figure of the same benchmark.
GOALS: list[tuple[str, str, str, Any, str, str]] = [
    ("reconcile", "overhead_vs_floor", "<=", 1.10,
     "wiped database, start to ready <= 1.10x the homeserver floor", "at 2,000 rooms"),
    ("reconcile", "speedup", ">=", 1.5,
     "wiped database, start to ready >= 1.5x faster than the naive serial read",
     "at 2,000 rooms"),
    ("reconcile", "second_run_writes", "==", 0, "= 0", "the delta and its verification"),
    ("reconcile", "restart_wall_seconds", "<=", 0.5,
     "database intact, start to ready <= 0.5 s", "at 2,000 rooms, issue 23"),
    ("reconcile", "restart_delta", "==", True, "every restart a delta start", ""),
    ("reconcile", "restart_growth", "<=", 1.5,
     "the same at 2,000 rooms / at 200 rooms <= 1.5", "issue 23"),
    ("reconcile", "background_repaired", "==", "background_hidden_changes",
     "the verification repairs exactly the changes only it can see", "issue 23"),
    ("synthetic", "seconds_100k", "<", 30, "< 30 s", ""),
    ("synthetic", "peak_rss_mb_100k", "<", 500, "< 500 MB", ""),
    ("synthetic", "growth_ratio", "<=", 12, "<= 12 for 10x rooms", ""),
    ("stream_cpu", "cpu_s_400k_cyrillic", "<=", 1.0,
     "400,000 Cyrillic characters in 4-character deltas, streamed and finished, <= 1 CPU-s",
     "issue 20"),
    ("latency", "overhead_p50_ms", "<=", 10, "<= 10 ms over two plain users", ""),
    ("first_words", "p50_ms", "<=", 150,
     "send to first words on screen minus the first-token delay, p50 <= 150 ms", ""),
    ("first_words", "p95_ms", "<=", 400, "the same, p95 <= 400 ms", ""),
    ("burst", "answered", "==", "messages", "= messages (100%)", ""),
    ("burst", "in_order", "==", True, "true", ""),
    ("burst", "duplicates", "==", 0, "= 0", ""),
    ("burst", "vs_plain_client", ">=", 0.8,
     "messages/s >= 0.8x a plain client on the bot's account", "issue 23"),
    ("provision", "alone_p50_s", "<=", 1.5,
     "one invite alone -> Space and room invites, p50 <= 1.5 s", ""),
    ("provision", "vs_plain_client_p50", "<=", 1.15,
     "all at once, p50 <= 1.15x the same requests by a plain client", ""),
    ("provision", "duplicates", "==", 0, "= 0", ""),
    ("faults", "lost", "==", 0, "= 0 messages left without their answer", ""),
    ("faults", "twice", "==", 0, "= 0", ""),
    ("faults", "out_of_order", "==", 0, "= 0", ""),
    ("faults", "messages", ">=", "messages_goal", ">= 100 quick, >= 500 full", ""),
    ("faults", "faults_per_kind_min", ">=", "faults_per_kind_goal",
     ">= 3 of each kind quick, >= 10 full", ""),
    ("faults", "recovery_p95_s", "<=", 15, "component back -> last answer, p95 <= 15 s", ""),
]  # fmt: skip
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, "==": operator.eq}
# Measured once per run; the others once per plugin database engine.
ENGINE_FREE = ("synthetic", "stream_cpu")

# What the table shows for each benchmark, in order (the goals' keys, then a few more).
SHOWN = {
    "synthetic": [
        ("seconds_1k", "s"), ("seconds_10k", "s"), ("seconds_100k", "s"),
        ("peak_rss_mb_10k", "MB"), ("peak_rss_mb_100k", "MB"), ("growth_ratio", "x"),
        ("growth_rooms_ratio", "x rooms"),
    ],
    "stream_cpu": [
        ("cpu_s_10k", "CPU-s"), ("cpu_s_12k", "CPU-s"), ("edits_10k", ""), ("edits_12k", ""),
        ("cpu_s_400k_cyrillic", "CPU-s"), ("messages_400k_cyrillic", ""),
    ],
    "reconcile": [
        ("rooms", ""), ("seconds", "s"), ("wall_seconds", "s"), ("naive_seconds", "s"),
        ("speedup", "x"), ("hs_floor_seconds", "s"), ("hs_floor_method", ""),
        ("overhead_vs_floor", "x"), ("requests", ""), ("naive_requests", ""),
        ("second_run_writes", ""), ("seconds_cold", "s"), ("naive_seconds_cold", "s"),
        ("restart_wall_seconds", "s"), ("restart_delta", ""), ("restart_changed_rooms", ""),
        ("restart_small_rooms", ""), ("restart_wall_seconds_small", "s"),
        ("restart_growth", "x"), ("background_hidden_changes", ""),
        ("background_repaired", ""), ("background_verify_seconds", "s"),
        ("background_verify_gate_to_line_seconds", "s"), ("rss_mb_small", "MB"),
        ("rss_mb", "MB"),
    ],
    "latency": [
        ("samples", ""), ("bot_p50_ms", "ms"), ("bot_p99_ms", "ms"), ("raw_p50_ms", "ms"),
        ("raw_p99_ms", "ms"), ("overhead_p50_ms", "ms"),
        ("overhead_over_bot_account_p50_ms", "ms"),
    ],
    "latency_e2e": [
        ("samples", ""), ("plain_p50_ms", "ms"), ("plain_p95_ms", "ms"), ("e2e_p50_ms", "ms"),
        ("e2e_p95_ms", "ms"), ("encrypted_overhead_p50_ms", "ms"),
        ("encrypted_overhead_p95_ms", "ms"), ("paired_difference_p50_ms", "ms"),
        ("undecryptable", ""),
    ],
    "first_words": [
        ("samples", ""), ("first_token_delay_ms", "ms"), ("stream_edit_interval_s", "s"),
        ("p50_ms", "ms"), ("p95_ms", "ms"), ("raw_p50_ms", "ms"),
        ("send_to_agent_p50_ms", "ms"), ("first_token_to_screen_p50_ms", "ms"),
        ("first_was_partial", ""),
    ],
    "provision": [
        ("alone_samples", ""), ("alone_p50_s", "s"), ("users", ""), ("rounds", ""), ("p50_s", "s"),
        ("p95_s", "s"), ("hs_floor_p50_s", "s"), ("vs_plain_client_p50", "x"),
        ("duplicates", ""),
    ],
    "burst": [
        ("messages", ""), ("answered", ""), ("in_order", ""), ("seconds", "s"),
        ("msgs_per_s", "/s"), ("duplicates", ""), ("plain_msgs_per_s", "/s"),
        ("vs_plain_client", "x"),
    ],
    "faults": [
        ("messages", ""), ("answered", ""), ("lost", ""), ("twice", ""), ("out_of_order", ""),
        ("fault_count", ""), ("faults_per_kind_min", ""), ("recovery_p95_s", "s"),
        ("recovery_max_s", "s"), ("unrecovered_faults", ""), ("recovered_p95_s", "s"),
        ("dangling_partials", ""), ("error_answers", ""), ("kind_maubot_kill", ""),
        ("kind_instance_restart", ""), ("kind_synapse_restart", ""),
        ("kind_postgres_restart", ""), ("kind_none", ""),
    ],
}  # fmt: skip


def sections(results: dict[str, Any]) -> list[tuple[str | None, str, dict[str, Any]]]:
    """(engine or None, benchmark, figures) for every benchmark in the results."""
    out: list[tuple[str | None, str, dict[str, Any]]] = []
    for bench in ENGINE_FREE:
        if results.get(bench):
            out.append((None, bench, results[bench]))
    for engine, figures in (results.get("engines") or {}).items():
        for bench in SHOWN:
            if bench not in ENGINE_FREE and figures.get(bench):
                out.append((engine, bench, figures[bench]))
    return out


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    engines = list(results.get("engines") or {}) or [None]
    for bench, key, op, target, reads, note in GOALS:
        for engine in [None] if bench in ENGINE_FREE else engines:
            where = results if engine is None else results["engines"][engine]
            data = where.get(bench) or {}
            value = data.get(key)
            goal_target = data.get(target) if isinstance(target, str) else target
            measured = value is not None and goal_target is not None  # else not run this time
            passed = bool(OPS[op](value, goal_target)) if measured else None
            out.append(
                {"engine": engine, "benchmark": bench, "key": key, "goal": reads,
                 "value": value, "pass": passed, "note": note}
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
    goals = {(g.get("engine"), g["benchmark"], g["key"]): g for g in results.get("goals", [])}
    rows = [("benchmark", "figure", "measured", "goal", "")]
    for engine, bench, data in sections(results):
        first = True
        for key, unit in SHOWN[bench]:
            goal = goals.get((engine, bench, key))
            if key not in data and goal is None:
                continue
            mark = ""
            reads = ""
            if goal:
                reads = goal["goal"] + (f" ({goal['note']})" if goal["note"] else "")
                mark = {True: "met", False: "MISSED", None: "n/a"}[goal["pass"]]
            name = f"{bench} [{engine}]" if engine else bench
            rows.append((name if first else "", key, _fmt(data.get(key), unit), reads, mark))
            first = False
        if "error" in data:
            rows.append(("", "error", str(data["error"])[:60], "", "FAILED"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    meta = results.get("meta", {})
    dirty = " (plugin modified)" if meta.get("git_dirty") else ""
    lines.append(
        f"\n{meta.get('mode')} run, {meta.get('seconds')} s; {meta.get('cpus')} CPUs; Synapse "
        f"{meta.get('synapse')}, maubot {meta.get('maubot')}; plugin database "
        f"{' and '.join(meta.get('engines') or [])}; commit {meta.get('git_commit')}{dirty}"
    )
    missed = [g for g in results.get("goals", []) if g["pass"] is False]
    if missed:
        lines.append(
            "goals missed: "
            + ", ".join(
                f"{g['benchmark']}.{g['key']}" + (f" [{g['engine']}]" if g["engine"] else "")
                for g in missed
            )
        )
    return "\n".join(lines)
