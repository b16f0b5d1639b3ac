"""``python -m bench [--quick] [--engines sqlite,postgres]``: every benchmark on a stack of its
own (one per plugin database engine), a table of the figures next to the goals, and
bench/results/latest.json (quick.json with --quick)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from devstack.procs import REPO
from devstack.synapse import synapse_python

from . import burst, faults, first_words, latency, provision, reconcile, stream_cpu, synthetic
from .env import BenchStack
from .report import evaluate, table

RESULTS = Path(__file__).resolve().parent / "results"

SIZES = {
    "quick": {
        "reconcile_rooms": 2_000,  # the goals are set at 2,000 rooms
        "reconcile_reps": 3,
        "synthetic": [1_000, 10_000],
        "synthetic_timeout": 120,
        "latency_samples": 30,
        "latency_e2e_samples": 30,
        "first_words_samples": 30,
        "provision_alone": 5,
        "provision_users": 10,
        "provision_rounds": 3,
        "burst_rooms": 10,
        "burst_per_room": 10,
        "stream_cpu_reps": 1,
        # faults: users x a message every interval_s while each kind of fault is injected
        # per_kind times (seeded), gap_s apart; the answers awaited wait_s at most after
        "faults_users": 6,
        "faults_per_kind": 3,
        "faults_messages": 100,
        "faults_interval_s": 4.0,
        "faults_gap_s": [6.0, 12.0],
        "faults_wait_s": 120.0,
        "faults_seed": 14,
    },
    "full": {
        "reconcile_rooms": 2_000,
        "reconcile_reps": 3,
        "synthetic": [10_000, 100_000],
        "synthetic_timeout": 900,
        "latency_samples": 200,
        "latency_e2e_samples": 200,
        "first_words_samples": 100,
        "provision_alone": 10,
        "provision_users": 50,
        "provision_rounds": 3,
        "burst_rooms": 50,
        "burst_per_room": 20,
        "stream_cpu_reps": 3,
        "faults_users": 10,
        "faults_per_kind": 10,
        "faults_messages": 500,
        "faults_interval_s": 5.0,
        "faults_gap_s": [6.0, 12.0],
        "faults_wait_s": 120.0,
        "faults_seed": 14,
    },
}
BENCHMARKS = (
    "synthetic", "stream_cpu", "reconcile", "latency", "latency_e2e", "first_words", "provision",
    "burst", "faults",
)  # fmt: skip
# The ones that run on a Synapse + maubot stack, once per plugin database engine.
STACK_BENCHMARKS = (
    "reconcile", "latency", "latency_e2e", "first_words", "provision", "burst", "faults",
)  # fmt: skip
ENGINES = ("sqlite", "postgres")

_t0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _t0:6.1f}s] {message}", flush=True)


def _label(size: int) -> str:
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)


def synthetic_keys(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ok = {size: r for size, r in runs.items() if "error" not in r}
    for size, r in runs.items():
        label = _label(size)
        if "error" in r:
            out[f"seconds_{label}"] = None
            out[f"synthetic_{label}_error"] = r["error"]
            continue
        out[f"seconds_{label}"] = r["seconds"]
        out[f"peak_rss_mb_{label}"] = r["peak_rss_mb"]
    sizes = sorted(ok)
    if len(sizes) >= 2 and ok[sizes[0]]["seconds"] > 0:
        small, big = sizes[0], sizes[-1]
        out["growth_ratio"] = round(ok[big]["seconds"] / ok[small]["seconds"], 1)
        out["growth_rooms_ratio"] = round(big / small, 1)
    out["synthetic"] = {_label(s): r for s, r in runs.items()}
    return out


def meta(mode: str, sizes: dict[str, Any], engines: list[str]) -> dict[str, Any]:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, timeout=30, cwd=REPO
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    digest = hashlib.sha256()
    for path in sorted((REPO / "lambda_plugin").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "mode": mode,
        "sizes": sizes,
        "engines": engines,
        "git_commit": run(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(run(["git", "status", "--porcelain", "--", "lambda_plugin"])),
        "bench_dirty": bool(run(["git", "status", "--porcelain", "--", "bench", "devstack"])),
        # what was measured, even when the plugin's files differ from the commit
        "plugin_sources_sha256": digest.hexdigest()[:16],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "synapse": run([synapse_python(), "-c", "import synapse; print(synapse.__version__)"]),
        "maubot": run([sys.executable, "-c", "import maubot; print(maubot.__version__)"]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def engines_of(args: argparse.Namespace) -> list[str]:
    """--engines, else --engine, else both for the full run and SQLite for the quick one."""
    if args.engines:
        wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    elif args.engine:
        wanted = [args.engine]
    else:
        wanted = ["sqlite"] if args.quick else list(ENGINES)
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown or not wanted:
        raise SystemExit(f"bench: unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    return list(dict.fromkeys(wanted))


async def main_async(args: argparse.Namespace) -> int:
    mode = "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
    for item in args.set or []:
        key, _, value = item.partition("=")
        sizes[key] = json.loads(value)
    only = set(args.only.split(",")) if args.only else set(BENCHMARKS)
    unknown = only - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"bench: unknown benchmark(s) {sorted(unknown)}")
    engines = engines_of(args)
    profile_dir = (RESULTS / f"profiles-{mode}") if args.profile else None
    results: dict[str, Any] = {"meta": meta(mode, sizes, engines)}
    failed = False

    async def attempt(where: dict[str, Any], name: str, coro) -> Any:
        nonlocal failed
        try:
            return await coro
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as e:
            failed = True
            log(f"{name} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            where.setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
            return None

    started = time.monotonic()
    if "synthetic" in only:
        log(f"synthetic plan() at {sizes['synthetic']} rooms, each in its own process")
        runs = await attempt(
            results,
            "synthetic",
            synthetic.run_sizes(
                sizes["synthetic"], sizes["synthetic_timeout"], log, profile_dir=profile_dir
            ),
        )
        if runs:
            results.setdefault("synthetic", {}).update(synthetic_keys(runs))
    if "stream_cpu" in only:
        # In this process, before any stack runs: its CPU time is the plugin code's alone.
        log(
            "stream_cpu: 10 KB, 12 KB and 400,000-character Cyrillic answers in 4-character "
            "deltas through StreamingReply"
        )
        got = await attempt(results, "stream_cpu", stream_cpu.measure(sizes["stream_cpu_reps"]))
        if got:
            results["stream_cpu"] = got
    if only & set(STACK_BENCHMARKS):
        results["engines"] = {}
        for engine in engines:
            on_engine = results["engines"][engine] = {}
            engine_started = time.monotonic()
            profiles = None
            if profile_dir is not None:
                profiles = profile_dir if engine == engines[0] else profile_dir / engine
            await run_stack(engine, only, sizes, on_engine, attempt, args.keep, profiles)
            on_engine["seconds"] = round(time.monotonic() - engine_started, 1)
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["goals"] = evaluate(results)
    print(table(results), flush=True)
    out = args.out or RESULTS / f"{'quick' if args.quick else 'latest'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")
    return 1 if failed else 0


async def run_latency_e2e(stack: BenchStack, samples: int) -> dict[str, Any]:
    # Imported here: its encrypting client needs python-olm (maubot's encryption extra), and
    # without it only this benchmark fails, saying so.
    from . import latency_e2e

    return await latency_e2e.run(stack, samples, log)


async def run_stack(
    engine: str,
    only: set[str],
    sizes: dict[str, Any],
    results: dict[str, Any],
    attempt,
    keep: bool,
    profile_dir: Path | None,
) -> None:
    """The stack benchmarks on a Synapse + maubot + plugin of their own, the plugin's
    database on ``engine``; figures into ``results``, each failure there too."""
    stack = BenchStack(engine=engine, keep=keep)
    try:
        log(f"[{engine}] starting Synapse + maubot + plugin (state in {stack.root})")
        await attempt(results, "stack", stack.start())
        if "stack" in results:  # nothing can run without it
            for name in only & set(STACK_BENCHMARKS):
                results.setdefault(name, {})["error"] = "the stack did not start"
            return
        log(f"[{engine}] stack up")
        if "reconcile" in only:
            got = await attempt(
                results,
                "reconcile",
                reconcile.run(
                    stack, sizes["reconcile_rooms"], sizes["reconcile_reps"], log, profile_dir
                ),
            )
            if got:
                results.setdefault("reconcile", {}).update(got)
            # whatever happened there, the plugin serves again
            await attempt(results, "reconcile", stack.set_instance_started(True))
        if "latency" in only:
            got = await attempt(
                results,
                "latency",
                latency.run(stack, sizes["latency_samples"], log, profile_dir),
            )
            if got:
                results["latency"] = got
        if "latency_e2e" in only:
            got = await attempt(
                results,
                "latency_e2e",
                run_latency_e2e(stack, sizes["latency_e2e_samples"]),
            )
            if got:
                results["latency_e2e"] = got
        if "first_words" in only:
            got = await attempt(
                results, "first_words", first_words.run(stack, sizes["first_words_samples"], log)
            )
            if got:
                results["first_words"] = got
        handoff = None
        if "provision" in only or "burst" in only:
            got = await attempt(
                results,
                "provision",
                provision.run(
                    stack,
                    sizes["provision_users"],
                    log,
                    sizes["provision_alone"],
                    sizes["provision_rounds"],
                ),
            )
            if got:
                results["provision"], handoff = got
        if "burst" in only and handoff:
            rooms = handoff[: sizes["burst_rooms"]]
            got = await attempt(
                results, "burst", burst.run(stack, rooms, sizes["burst_per_room"], log)
            )
            if got:
                results["burst"] = got
        if "faults" in only:  # last: it kills and restarts the stack's servers
            got = await attempt(
                results,
                "faults",
                faults.run(
                    stack,
                    users=sizes["faults_users"],
                    per_kind=sizes["faults_per_kind"],
                    messages=sizes["faults_messages"],
                    interval_s=sizes["faults_interval_s"],
                    gap_s=tuple(sizes["faults_gap_s"]),
                    wait_s=sizes["faults_wait_s"],
                    seed=sizes["faults_seed"],
                    log=log,
                ),
            )
            if got:
                results["faults"] = got
    finally:
        log(f"[{engine}] stopping the stack")
        await stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/run.sh")
    parser.add_argument("--quick", action="store_true", help="small sizes, under 5 minutes")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument(
        "--engines",
        help="the plugin's database engines, comma-separated, each on a stack of its own "
        "(default: sqlite,postgres for the full run, sqlite for --quick)",
    )
    parser.add_argument("--engine", choices=ENGINES, help="one engine: --engines ENGINE")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy maubot and Synapse during one reconciliation, pyinstrument "
        "the synthetic plan(); written to bench/results/profiles-<mode>/",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=JSON",
        help="override a size, e.g. --set reconcile_rooms=500",
    )
    parser.add_argument("--keep", action="store_true", help="keep the servers' state folder")
    parser.add_argument("--out", type=Path, help="results file (default by mode)")
    args = parser.parse_args()  # fmt: skip

    async def runner() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main_async(args)

    try:
        code = asyncio.run(runner())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: everything started was stopped; no results written", flush=True)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
