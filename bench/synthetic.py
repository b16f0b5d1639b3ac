"""Synthetic reconciliation at 10k / 100k rooms: homeserver answers generated in memory,
the plugin's code unchanged. ``seconds`` is the plugin's processing of the answers: parsing
(done per room as it arrives, where the plugin does that) plus ``plan()``; JSON decoding,
which any client pays, is ``decode_seconds``. Each size runs in its own process (its peak RSS
is ru_maxrss): ``python -m bench.synthetic --rooms 100000`` prints one JSON object.

Every room's /state answer is made as Synapse writes it (the full state: power levels, join
rules and all, as JSON text) and decoded and filtered to the reconciler's types exactly as
``Reconciler.read_topology`` does, so the memory held is what the plugin would hold.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lambda_plugin import reconcile as plugin_reconcile
from lambda_plugin.marker import KIND_CHAT, KIND_SPACE, MARKER_TYPE, Marker
from lambda_plugin.reconcile import plan

from .topology import layout

BOT = "@lambda_bench:localhost"
SERVER = "localhost"
_PL = {
    "users": {BOT: 100, "@OWNER": 50},
    "users_default": 0,
    "events": {
        MARKER_TYPE: 100, "m.space.child": 100, "m.space.parent": 100,
        "m.room.power_levels": 100, "m.room.tombstone": 100, "m.room.encryption": 100,
        "m.room.server_acl": 100, "m.room.join_rules": 100, "m.room.history_visibility": 100,
        "m.room.canonical_alias": 100, "m.room.name": 50, "m.room.topic": 50, "m.room.avatar": 50,
    },
    "events_default": 0, "state_default": 100, "ban": 100, "kick": 100, "redact": 100,
    "invite": 50, "historical": 100,
}  # fmt: skip


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def room(self) -> str:
        self.n += 1
        return f"!{self.n:018x}Bench:{SERVER}"

    def event(self) -> str:
        self.n += 1
        return f"${self.n:043x}"


def _event(ids: Ids, room_id: str, etype: str, key: str, content: dict, sender: str, ts: int):
    return {
        "type": etype,
        "room_id": room_id,
        "sender": sender,
        "content": content,
        "state_key": key,
        "origin_server_ts": ts,
        "unsigned": {"age": 123456},
        "event_id": ids.event(),
    }


def _room_base(ids: Ids, room_id: str, creator: str, ts: int, space: bool, pl: dict) -> list:
    create = {"room_version": "10", "creator": creator}
    if space:
        create["type"] = "m.space"
    return [
        _event(ids, room_id, "m.room.create", "", create, creator, ts),
        _event(ids, room_id, "m.room.member", creator,
               {"membership": "join", "displayname": creator[1:].split(":")[0]}, creator, ts + 1),
        _event(ids, room_id, "m.room.power_levels", "", pl, creator, ts + 2),
        _event(ids, room_id, "m.room.join_rules", "", {"join_rule": "invite"}, creator, ts + 3),
        _event(ids, room_id, "m.room.history_visibility", "", {"history_visibility": "shared"},
               creator, ts + 4),
        _event(ids, room_id, "m.room.guest_access", "", {"guest_access": "can_join"}, creator,
               ts + 5),
    ]  # fmt: skip


def answers(rooms: int, dms: bool = True) -> Iterator[str]:
    """The /state answers (JSON text), one room at a time as the reads deliver them, of a bot
    with ``rooms`` managed rooms laid out as the real benchmark does (owners with a Space and
    9 chats each), plus one DM per owner."""
    owners, chats = layout(rooms)
    ids = Ids()
    ts = 1_700_000_000_000
    for o in range(owners):
        owner = f"@owner{o}:{SERVER}"
        pl = {**_PL, "users": {BOT: 100, owner: 50}}
        invite = {"membership": "invite", "displayname": f"owner{o}"}
        if dms:
            dm = ids.room()
            events = _room_base(ids, dm, owner, ts, False, {**_PL, "users": {owner: 100}})
            events.append(_event(ids, dm, "m.room.member", BOT, {"membership": "join"}, BOT, ts))
            yield json.dumps(events)
        space = ids.room()
        space_events = _room_base(ids, space, BOT, ts, True, pl)
        space_events.append(
            _event(ids, space, MARKER_TYPE, "", Marker(KIND_SPACE, owner).content(), BOT, ts)
        )
        space_events.append(_event(ids, space, "m.room.name", "", {"name": f"Lambda — owner{o}"},
                                   BOT, ts))  # fmt: skip
        space_events.append(_event(ids, space, "m.room.member", owner, invite, BOT, ts))
        for n in range(1, chats + 1):
            room = ids.room()
            marker = Marker(
                KIND_CHAT, owner, space, f"C{n}", "echo", f"mx-{o:016x}{n:016x}"
            ).content()
            events = _room_base(ids, room, BOT, ts + n * 10, False, pl)
            events += [
                _event(ids, room, MARKER_TYPE, "", marker, BOT, ts + n * 10),
                _event(ids, room, "m.space.parent", space, {"via": [SERVER], "canonical": True},
                       BOT, ts + n * 10),
                _event(ids, room, "m.room.name", "", {"name": f"Chat {n}"}, BOT, ts + n * 10),
                _event(ids, room, "m.room.member", owner, invite, BOT, ts + n * 10),
            ]  # fmt: skip
            yield json.dumps(events)
            space_events.append(
                _event(ids, space, "m.space.child", room,
                       {"via": [SERVER], "order": f"{n:08d}"}, BOT, ts + n * 10 + 1)
            )  # fmt: skip
        yield json.dumps(space_events)
        ts += 1000


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(rooms: int, dms: bool, profile: Path | None) -> dict[str, Any]:
    gc.collect()
    rss_start = rss_mb()
    owners, chats = layout(rooms)
    # What read_topology does with each answer: decoded, then parsed as it arrives (the
    # plugin's parse_room, when it has one) or filtered to the reconciler's types (before).
    parse_room = getattr(plugin_reconcile, "parse_room", None)
    wanted = frozenset(plugin_reconcile.STATE_TYPES)
    decode_s = parse_s = 0.0
    states: dict[str, Any] = {}
    clock = time.perf_counter
    gen_s = 0.0
    texts = answers(rooms, dms)
    while True:
        t = clock()
        text = next(texts, None)  # made here one by one: never all answers in memory at once
        t0 = clock()
        gen_s += t0 - t
        if text is None:
            break
        events = json.loads(text)
        t1 = clock()
        room_id = events[0]["room_id"]
        if parse_room is not None:
            states[room_id] = parse_room(room_id, events, BOT)
        else:
            states[room_id] = [e for e in events if e.get("type") in wanted]
        parse_s += clock() - t1
        decode_s += t1 - t0
    del text, events
    gc.collect()
    rss_input = rss_mb()
    started = time.monotonic()
    result = plan(states, BOT, SERVER, {}, {}, "echo")
    plan_s = time.monotonic() - started
    seconds = parse_s + plan_s
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        from pyinstrument import Profiler
    except ImportError:  # optional: .venvs/maubot/bin/pip install pyinstrument
        profile = None
    if profile is not None:  # once more, under the profiler (not in the figures)
        profiler = Profiler(interval=0.001)
        profiler.start()
        plan(states, BOT, SERVER, {}, {}, "echo")
        profiler.stop()
        profile.write_text(profiler.output_text(unicode=True, color=False, show_all=False))
    report = result.report.as_dict()
    # A second start on a consistent database: the first plan's rows are what it knows.
    started = time.monotonic()
    again = plan(states, BOT, SERVER, dict(result.users), dict(result.rooms), "echo")
    second_s = time.monotonic() - started
    expected_writes = owners + owners * chats
    return {
        "rooms": owners * (chats + 1),
        "joined_rooms": len(states),
        "dms": dms,
        "seconds": round(seconds, 3),
        "plan_seconds": round(plan_s, 3),
        "parse_seconds": round(parse_s, 3),
        "parsed_at_read": parse_room is not None,
        "decode_seconds": round(decode_s, 3),
        "generate_seconds": round(gen_s, 3),
        "second_run_seconds": round(second_s, 3),
        "second_run_writes": again.report.writes,
        "peak_rss_mb": round(peak, 1),
        "rss_before_input_mb": round(rss_start, 1),
        "rss_with_input_mb": round(rss_input, 1),
        "writes": report["writes"],
        "writes_expected": expected_writes,
        "correct": report["writes"] == expected_writes and report["conflicts"] == 0,
    }


async def run_sizes(
    sizes: list[int],
    timeout: float,
    log,
    dms: bool = True,
    profile_dir: Path | None = None,
    reps: int = 3,
) -> dict[int, dict[str, Any]]:
    """Each size ``reps`` times, each run in a subprocess of its own bounded by ``timeout``
    seconds (killed after); the run with the median ``seconds`` stands for the size (one
    short run alone is at the mercy of the machine's noise), all runs' seconds beside it."""
    out: dict[int, dict[str, Any]] = {}
    for size in sizes:
        cmd = [sys.executable, "-m", "bench.synthetic", "--rooms", str(size)]
        if not dms:
            cmd.append("--no-dms")
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            suffix = "" if dms else "-nodm"
            cmd += ["--profile", str(profile_dir / f"synthetic-{size}{suffix}.txt")]
        runs = []
        for _ in range(reps):
            runs.append(await _one_process(cmd, timeout))
            if "error" in runs[-1]:
                break
        if "error" in runs[-1]:
            out[size] = runs[-1]
            log(f"synthetic {size} rooms failed: {out[size]['error']}")
            continue
        runs.sort(key=lambda r: r["seconds"])
        out[size] = {**runs[len(runs) // 2], "seconds_runs": [r["seconds"] for r in runs]}
        log(
            f"synthetic {size} rooms{'' if dms else ' (no DMs)'}: plan {out[size]['seconds']:.2f}s"
            f" (median of {len(runs)}), peak RSS {out[size]['peak_rss_mb']:.0f} MB"
        )
    return out


async def _one_process(cmd: list[str], timeout: float) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"error": f"timed out after {timeout:.0f}s"}
    if proc.returncode != 0:
        return {"error": stderr.decode(errors="replace").strip()[-500:]}
    return json.loads(stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic")
    parser.add_argument("--rooms", type=int, required=True)
    parser.add_argument("--no-dms", action="store_true")
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()
    print(json.dumps(measure(args.rooms, not args.no_dms, args.profile)))


if __name__ == "__main__":
    main()
