"""Optional sampling profiles (py-spy) of maubot and Synapse during one measurement, summed
up as where the samples fell: the plugin's code, mautrix, aiohttp, the database, asyncio."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

CATEGORIES = (
    ("waiting", ("Condition.wait (", "EpollSelector.select (", "_connection_worker_thread (",
                 "Queue.get (", "Event.wait (", "Thread.join (")),
    ("lambda_plugin", ("lambda_plugin/",)),
    ("mautrix", ("mautrix/",)),
    ("maubot", ("maubot/",)),
    ("aiohttp", ("aiohttp/", "yarl/", "multidict/")),
    ("database", ("asyncpg/", "aiosqlite/", "sqlite3/", "sqlalchemy/")),
    ("json", ("json/",)),
    ("asyncio", ("asyncio/", "selectors.py")),
    ("synapse", ("synapse/",)),
    ("twisted", ("twisted/",)),
)  # fmt: skip


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy record of one process, from start() to stop(), as collapsed stacks."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.proc: subprocess.Popen | None = None

    def start(self) -> bool:
        exe = py_spy()
        if exe is None:
            return False
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw",
             "--nonblocking", "--full-filenames", "--output", str(self.out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return True

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        return summarize(self.out) if self.out.exists() else None


def _category(frame: str) -> str:
    for name, needles in CATEGORIES:
        if any(n in frame for n in needles):
            return name
    return "other"


def _short(frame: str) -> str:
    """``func (/long/path/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, _, where = frame.partition(" (")
    parts = where.rstrip(")").split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def summarize(path: Path, top: int = 12) -> dict:
    """Self time by category (innermost frame), and inclusive time of the plugin's functions."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf_funcs: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_time[_category(frames[-1])] += count
        leaf_funcs[_short(frames[-1])] += count
        seen = set()
        for frame in frames:
            if _category(frame) == "lambda_plugin":
                name = frame.split(" (")[0] + " (" + frame.split("lambda_plugin/")[-1]
                if name not in seen:
                    seen.add(name)
                    inclusive[name] += count
    if not total:
        return {"samples": 0}

    def pct(counter: Counter[str]) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(top)}

    return {
        "samples": total,
        "self_pct_by_area": pct(self_time),
        "plugin_inclusive_pct": pct(inclusive),
        "hottest_frames_pct": pct(leaf_funcs),
        "file": str(path),
    }
