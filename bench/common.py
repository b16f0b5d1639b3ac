"""Pieces every benchmark uses: a user's own sync loop with arrival times, percentiles,
process CPU time, and reading the maubot log from a byte offset."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from devstack.matrix import Event, MatrixUser

# What a benchmark user's sync asks for: room timelines and invites only. Typing and receipts
# are left out, so they never wake the long poll early; a big timeline limit, so a burst is
# never cut to a "limited" window.
SYNC_FILTER = {
    "presence": {"not_types": ["*"]},
    "account_data": {"not_types": ["*"]},
    "room": {
        "timeline": {"limit": 1000},
        "ephemeral": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
        "include_leave": False,
    },
}
# The filter maubot's client syncs with (maubot/client.py): what the bot's account costs
# the homeserver per sync, whatever the plugin does.
MAUBOT_SYNC_FILTER = {
    "room": {
        "timeline": {"limit": 50, "lazy_load_members": True},
        "state": {"lazy_load_members": True},
    },
    "presence": {"not_types": ["m.presence"]},
}


class SyncLoop:
    """A user's long-poll sync running on its own; every event is kept with the monotonic time
    its sync answer arrived. ``on_event`` / ``on_invite`` (optional) are called for each new
    timeline event / invite as it arrives."""

    def __init__(
        self,
        user: MatrixUser,
        on_event: Callable[[str, Event, float], None] | None = None,
        poll_ms: int = 10_000,
        on_invite: Callable[[str, list[Event], float], None] | None = None,
        sync_filter: dict[str, Any] | None = None,
    ) -> None:
        self.user = user
        self.sync_filter = sync_filter or SYNC_FILTER
        self.on_event = on_event
        self.on_invite = on_invite
        self.poll_ms = poll_ms
        self.timeline: dict[str, list[tuple[float, Event]]] = {}
        self.invites: dict[str, tuple[float, list[Event]]] = {}
        self.since: str | None = None
        self.filter_id: str | None = None
        self.syncs = 0
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """One immediate sync first (so later waits see only what is new), then the loop."""
        path = f"/_matrix/client/v3/user/{quote(self.user.user_id)}/filter"
        self.filter_id = (await self.user.request("POST", path, self.sync_filter))["filter_id"]
        await self._sync_once(0)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        try:
            while True:
                await self._sync_once(self.poll_ms)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # surfaced to waiters, never lost
            self.error = e
            self._changed.set()

    async def _sync_once(self, timeout_ms: int) -> None:
        params: dict[str, Any] = {"timeout": str(timeout_ms), "filter": self.filter_id}
        if self.since:
            params["since"] = self.since
        data = await self.user.request("GET", "/_matrix/client/v3/sync", **params)
        now = time.monotonic()
        self.syncs += 1
        self.since = data["next_batch"]
        rooms = data.get("rooms", {})
        for room_id, room in rooms.get("join", {}).items():
            events = room.get("timeline", {}).get("events", [])
            bucket = self.timeline.setdefault(room_id, [])
            for event in events:
                bucket.append((now, event))
                if self.on_event is not None:
                    self.on_event(room_id, event, now)
        for room_id, room in rooms.get("invite", {}).items():
            if room_id not in self.invites:
                state = room.get("invite_state", {}).get("events", [])
                self.invites[room_id] = (now, state)
                if self.on_invite is not None:
                    self.on_invite(room_id, state, now)
        self._changed.set()

    async def wait(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """Waits (bounded) until ``check()`` returns something truthy, and returns it."""
        deadline = time.monotonic() + timeout
        while True:
            found = check()
            if found:
                return found
            if self.error is not None:
                raise RuntimeError(f"{self.user.user_id}: sync failed: {self.error!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.user.user_id}: timed out waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))

    def events(self, room_id: str) -> list[tuple[float, Event]]:
        return self.timeline.get(room_id, [])


def invite_is_space(state: list[Event]) -> bool:
    for event in state:
        if event.get("type") == "m.room.create":
            return event.get("content", {}).get("type") == "m.space"
    return False


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class CpuMeter:
    """CPU seconds each named process spends between start() and stop()."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.before: dict[str, float] = {}
        self.result: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.before["bench"] = time.process_time()
        return self

    def stop(self) -> dict[str, float]:
        self.result = {
            f"{name}_cpu_s": round(cpu_seconds(pid) - self.before[name], 3)
            for name, pid in self.pids.items()
        }
        self.result["bench_cpu_s"] = round(time.process_time() - self.before["bench"], 3)
        return self.result


async def wait_idle(
    pids: dict[str, int | None], timeout: float, threshold: float = 0.10, window: float = 1.0
) -> float:
    """Waits (bounded) until every process uses under ``threshold`` of a core over ``window``
    seconds: work a previous step queued (maubot catching up on a sync) must not run during
    a measurement. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        await asyncio.sleep(window)
        busy = max(cpu_seconds(pid) - before[name] for name, pid in pids.items()) / window
        if busy < threshold:
            break
    return time.monotonic() - started


class LogTail:
    """Reads a growing log file from a byte offset; lines carry maubot's asctime."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def read_from(self, offset: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return b""

    async def wait_for(self, needle: str, after: int, timeout: float) -> tuple[str, float]:
        """The first line containing ``needle`` written after ``after``, and its log time
        (epoch seconds)."""
        deadline = time.monotonic() + timeout
        offset = after
        carry = b""
        while True:
            chunk = self.read_from(offset)
            offset += len(chunk)
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()  # a line still being written
            for raw in lines:
                line = raw.decode(errors="replace")
                if needle in line:
                    return line, log_time(line)
            if time.monotonic() > deadline:
                raise TimeoutError(f"log line {needle!r} not seen in {timeout:.0f}s ({self.path})")
            await asyncio.sleep(0.02)


def log_time(line: str) -> float:
    """Epoch seconds of a maubot log line, ``[2025-01-02 03:04:05,678] [...] ...``."""
    stamp = line[1 : line.index("]")]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def report_values(line: str) -> dict[str, str]:
    """``key=value`` pairs of a "Reconciled: ..." line."""
    tail = line.split("Reconciled: ", 1)[1]
    return dict(part.split("=", 1) for part in tail.split() if "=" in part)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=str)


_ACCESS = re.compile(
    r"\{(?P<user>[^}]*)\} Processed request: (?P<sec>[\d.]+)sec/[\d.]+sec "
    r"(?:ru=)?\((?P<cpu>[\d.]+)sec, (?P<sys>[\d.]+)sec\) .*?\"(?P<method>[A-Z]+) (?P<path>\S+) HTTP"
)


def endpoint(path: str) -> str:
    """``/_matrix/client/v3/rooms/!a:b/send/m.room.message/txn`` -> ``rooms/*/send/*/*``."""
    path = path.split("?", 1)[0].removeprefix("/_matrix/client/")
    parts = path.split("/")[1:]  # drop the version
    out = []
    for i, part in enumerate(parts):
        variable = part[:1] in "!$@%" or (i > 0 and parts[i - 1] in _VARIABLE_AFTER)
        out.append("*" if variable else part)
    return "/".join(out)


_VARIABLE_AFTER = {"send", "state", "typing", "receipt", "join", "m.read", "profile", "user",
                   "filter", "m.room.message", "m.room.encrypted", "sendToDevice"}  # fmt: skip


def homeserver_requests(log: Path, after: int, user_id: str) -> dict[str, dict[str, float]]:
    """Requests ``user_id`` made, from Synapse's access log past byte ``after``: by endpoint,
    how many, and the seconds Synapse took over them (wall, and its CPU: user + system)."""
    try:
        with open(log, "rb") as f:
            f.seek(after)
            text = f.read().decode(errors="replace")
    except OSError:
        return {}
    out: dict[str, dict[str, float]] = {}
    for match in _ACCESS.finditer(text):
        if match["user"] != user_id:
            continue
        name = f"{match['method']} {endpoint(match['path'])}"
        if name.startswith("GET sync"):  # the client's long poll names a stored filter
            inline = "filter=%7B" in match["path"] or "filter={" in match["path"]
            name += " (inline filter)" if inline else " (stored filter)"
        entry = out.setdefault(name, {"count": 0, "seconds": 0.0, "cpu": 0.0})
        entry["count"] += 1
        entry["seconds"] += float(match["sec"])
        entry["cpu"] += float(match["cpu"]) + float(match["sys"])
    return out
