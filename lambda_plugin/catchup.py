"""Catch-up after a start: what users said while the bot was down, or in its first seconds up.

maubot drops every event of the first sync after a start, user messages included, so after
reconciliation the plugin reads the recent timeline of every room itself (one filtered
``/sync``), merges it with what maubot's first sync held and with what the ledger says was
left unfinished (a crash, a stop mid-answer), and puts it all at the head of the rooms'
queues: one sequence per room, messages and commands alike, in timeline order, each event
once. ``intake.classify`` decides what each is; the ledger decides what is done.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from .db import LedgerRow
from .intake import ANSWERING, Incoming, Kind, answered_ids, classify
from .ledger import DONE, Fate, incoming_of
from .matrix import HomeserverError, Matrix, one_off_sync_filter
from .queue import RoomQueues

TIMELINE_LIMIT = 50
CATCH_UP_TYPES = ["m.room.message", "m.reaction", "m.room.encrypted"]  # encrypted: decrypted after
PAGE_LIMIT = 100  # events per /messages page when a room's timeline was cut (limited)
SYNC_TOKEN_KEY = "catch_up_since"
# Where the next start's delta reads state changes from: the newest position this process
# saw, once its start had reconciled (a change no live handler applied is repaired by the
# verification that follows every delta start).
DELTA_TOKEN_KEY = "delta_since"
# The same position in the bot's account data: the rooms are the truth, and where the
# catch-up resumes from survives a lost database too (no full /sync over every room).
SYNC_POSITION_TYPE = "ai.lambda.matrix.catch_up"


def catch_up_filter() -> str:
    return one_off_sync_filter({"limit": TIMELINE_LIMIT, "types": CATCH_UP_TYPES})


def parse_invites(sync: dict[str, Any], bot_id: str) -> list[tuple[str, str]]:
    """(room, inviter) of every pending invite of the bot in a /sync answer."""
    invites = []
    rooms = sync.get("rooms") if isinstance(sync, dict) else None
    invited = rooms.get("invite") if isinstance(rooms, dict) else None
    for room_id, data in (invited if isinstance(invited, dict) else {}).items():
        state = data.get("invite_state") if isinstance(data, dict) else None
        events = state.get("events") if isinstance(state, dict) else None
        for event in events if isinstance(events, list) else []:
            if (
                isinstance(event, dict)
                and event.get("type") == "m.room.member"
                and event.get("state_key") == bot_id
                and isinstance(event.get("sender"), str)
            ):
                invites.append((room_id, event["sender"]))
                break
    return invites


def timelines_of(sync: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each joined room's timeline events in a /sync answer (malformed parts left out)."""
    rooms = sync.get("rooms") if isinstance(sync, dict) else None
    joined = rooms.get("join") if isinstance(rooms, dict) else None
    found = {}
    for room_id, room in (joined if isinstance(joined, dict) else {}).items():
        timeline = room.get("timeline") if isinstance(room, dict) else None
        events = timeline.get("events") if isinstance(timeline, dict) else None
        if isinstance(room_id, str) and isinstance(events, list):
            found[room_id] = [e for e in events if isinstance(e, dict)]
    return found


def cut_timelines(sync: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(room, timeline) of each joined room whose timeline in a /sync answer was cut short
    (``limited`` with a position to page back from); malformed ones left out."""
    rooms = sync.get("rooms") if isinstance(sync, dict) else None
    joined = rooms.get("join") if isinstance(rooms, dict) else None
    found = []
    for room_id, room in (joined if isinstance(joined, dict) else {}).items():
        timeline = room.get("timeline") if isinstance(room, dict) else None
        if (
            isinstance(timeline, dict) and timeline.get("limited") is True
            and isinstance(timeline.get("prev_batch"), str)
            and isinstance(timeline.get("events"), list)
        ):  # fmt: skip
            found.append((room_id, timeline))
    return found


def _oldest_ms(events: list[Any]) -> int:
    """The timestamp of the oldest event read (the first with one); none read: the newest."""
    for event in events:
        ts = event.get("origin_server_ts") if isinstance(event, dict) else None
        if isinstance(ts, int) and not isinstance(ts, bool):
            return ts
    return 2**63


def partials_of(events: list[dict[str, Any]], bot_id: str) -> dict[str, str]:
    """For each message an unfinished answer names (``intake.ANSWERING``), the bot's first
    such event (a stream's first): the one a re-answer finishes."""
    found: dict[str, str] = {}
    for event in events:
        if not isinstance(event, dict):
            continue
        content = event.get("content")
        event_id = event.get("event_id")
        if event.get("sender") == bot_id and isinstance(content, dict) and isinstance(event_id, str):
            answering = content.get(ANSWERING)
            relates = content.get("m.relates_to")
            if isinstance(answering, str) and not isinstance(relates, dict):
                found.setdefault(answering, event_id)  # the first: a stream's first event
    return found


@dataclass
class StartPlan:
    """What a start hands to the rooms' queues, and what it found already done."""

    rooms: dict[str, list[Incoming]] = field(default_factory=dict)  # in timeline order
    answered: list[str] = field(default_factory=list)  # unfinished in the ledger, answered in the room

    @property
    def count(self) -> int:
        return sum(len(items) for items in self.rooms.values())

    def without(self, ignored: Callable[[Incoming], bool]) -> list[Incoming]:
        """Takes out what the rooms do not answer (another member's, with shared rooms
        off): it takes no place in a queue, or a flood sent while the bot was away would
        fill the owner's. Returns what was taken out."""
        dropped = []
        for room_id, items in list(self.rooms.items()):
            kept = [i for i in items if not ignored(i)]
            dropped += [i for i in items if ignored(i)]
            if kept:
                self.rooms[room_id] = kept
            else:
                del self.rooms[room_id]
        return dropped


def plan_start(
    timelines: dict[str, list[dict[str, Any]]],
    unfinished: list[LedgerRow],
    states: dict[str, str],
    bot_id: str,
    since_ms: int,
    active: Collection[str] | None = None,
) -> StartPlan:
    """Pure: the events a start runs, per room, in timeline order, each once. From the
    timelines (the catch-up's read and maubot's first sync): every message and command
    since ``since_ms`` that no answer in the room names and the ledger has not ended. From
    the ledger: every event left unfinished, however old. Done = an end in the ledger other
    than kept, or a finished answer in the room naming it (a lost database answers nothing
    twice). Messages count only in ``active`` rooms (when given); commands everywhere."""
    picked: dict[str, dict[str, tuple[int, int, Incoming]]] = {}  # (group, position, event)
    answered = {
        room_id: _pick_from_timeline(
            picked.setdefault(room_id, {}), room_id, events, states, bot_id, since_ms,
            active is None or room_id in active,
        )
        for room_id, events in timelines.items()
    }  # fmt: skip
    plan = StartPlan(
        answered=[r.event_id for r in unfinished if r.event_id in answered.get(r.room_id, ())]
    )
    done = set(plan.answered)
    for row in unfinished:
        kept = incoming_of(row, bot_id)
        if kept is None or row.event_id in done:
            continue
        room = picked.setdefault(row.room_id, {})
        if row.event_id in room:  # where the timeline has it
            if not kept.resume:
                kept = kept.resuming(room[row.event_id][2].resume)
            room[row.event_id] = (*room[row.event_id][:2], kept)
        else:  # not in what was read: placed by time
            room[row.event_id] = (0, kept.timestamp, kept)
    for room_id, entries in picked.items():
        if entries:
            plan.rooms[room_id] = _in_order(list(entries.values()))
    return plan


def _pick_from_timeline(
    room: dict[str, tuple[int, int, Incoming]], room_id: str, events: list[Any],
    states: dict[str, str], bot_id: str, since_ms: int, messages: bool,
) -> set[str]:  # fmt: skip
    """Puts into ``room`` each event of the timeline a start runs, at its position in the
    timeline (a sender's clock may be off: not by timestamp); returns what answers name."""
    answered = answered_ids(events, bot_id)
    partials = partials_of(events, bot_id)
    for position, raw in enumerate(events):
        if not isinstance(raw, dict):
            continue
        found = classify({**raw, "room_id": room_id}, bot_id)
        if (
            found.kind is Kind.IGNORED or found.event_id in answered
            or found.timestamp < since_ms
            or (found.is_message and not messages)
            or states.get(found.event_id) in DONE | {Fate.KEPT.value}
        ):  # fmt: skip
            continue
        found = found.resuming(partials.get(found.event_id, ""))
        room.setdefault(found.event_id, (1, position, found))
    return answered


def _in_order(entries: list[tuple[int, int, Incoming]]) -> list[Incoming]:
    """The timeline's events in its order; the ledger's others placed among them by time."""
    ordered = [e[2] for e in sorted((e for e in entries if e[0] == 1), key=lambda e: e[1])]
    for _, _, incoming in sorted((e for e in entries if e[0] == 0), key=lambda e: e[1]):
        later = (i for i, e in enumerate(ordered) if e.timestamp > incoming.timestamp)
        ordered.insert(next(later, len(ordered)), incoming)
    return ordered


def merged(*sources: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Timelines from several reads, each room's events once (by event id), in room order:
    an event another read lacks goes right after the event it follows in its own read (or,
    with none shared before it, by its timestamp): every read's own order is kept."""
    rooms: dict[str, list[dict[str, Any]]] = {}
    for source in sources:
        for room_id, events in source.items():
            rooms[room_id] = _merge_one(rooms.get(room_id, []), events)
    return rooms


def _merge_one(into: list[dict[str, Any]], events: list[Any]) -> list[dict[str, Any]]:
    result = list(into)
    at = {str(e.get("event_id")): i for i, e in enumerate(result)}
    anchor: int | None = None  # where the last shared event of ``events`` is in ``result``
    for event in events:
        if not isinstance(event, dict):
            continue
        key = str(event.get("event_id"))
        if key in at:
            anchor = at[key]
            continue
        if anchor is None:
            ts = event.get("origin_server_ts")
            ts = ts if isinstance(ts, int) else 0
            later = (
                i for i, e in enumerate(result)
                if isinstance(e.get("origin_server_ts"), int) and e["origin_server_ts"] > ts
            )  # fmt: skip
            place = next(later, len(result))
        else:
            place = anchor + 1
        result.insert(place, event)
        at = {str(e.get("event_id")): i for i, e in enumerate(result)}
        anchor = place
    return result


class SyncPositions:
    """Where maubot's sync stood, over time. Catch-up after a restart reads from a position
    at least the catch-up window old: an incremental /sync from there is cheap (only rooms
    with news), where a full one walks every room the bot is in."""

    def __init__(self) -> None:
        self.seen: deque[tuple[float, str]] = deque()

    def record(self, token: str) -> None:
        self.seen.append((time.time(), token))

    def newest(self) -> str | None:
        return self.seen[-1][1] if self.seen else None

    def older_than(self, age_s: float) -> str | None:
        """The newest position seen at least ``age_s`` ago (older ones are dropped)."""
        cutoff = time.time() - age_s
        found = None
        while self.seen and self.seen[0][0] <= cutoff:
            found = self.seen.popleft()[1]
        if found is not None:
            self.seen.appendleft((cutoff, found))  # still the answer until a newer one ages
        return found


class CatchUp:
    """Reads what was missed and queues it, messages and commands as one sequence per room."""

    def __init__(
        self,
        mx: Matrix,
        queues: RoomQueues,
        log: logging.Logger,
        max_events: Callable[[], int] = lambda: 1000,
    ) -> None:
        self.mx = mx
        self.queues = queues
        self.log = log
        self.max_events = max_events  # per room, a cut timeline paged back included

    async def read(self, since: str | None, back_to_ms: int = 0) -> dict[str, Any]:
        """One /sync from ``since`` (the whole recent timeline when None or unknown); a room
        whose timeline the homeserver cut (``limited``: more happened than one answer holds,
        e.g. edits and reactions in an encrypted room) is paged back to ``back_to_ms``."""
        query = {"filter": catch_up_filter(), "timeout": "0"}
        if since:
            query["since"] = since  # only what happened since; else every room is walked
        try:
            sync = await self.mx.sync(query)
        except HomeserverError:
            if not since:
                raise
            del query["since"]  # a position the homeserver no longer knows: read it all
            sync = await self.mx.sync(query)
        for room_id, timeline in cut_timelines(sync):
            await self._page_back(room_id, timeline, back_to_ms)
        return sync

    async def _page_back(self, room_id: str, timeline: dict[str, Any], back_to_ms: int) -> None:
        """Puts the events before a cut timeline in front of it, up to ``max_events`` in all
        and back to ``back_to_ms``; a read that fails keeps what was read."""
        events: list[Any] = timeline["events"]
        before: str | None = timeline["prev_batch"]
        most = self.max_events()
        pages = -(-most // PAGE_LIMIT) + 1  # a homeserver that pages on forever is cut off
        while before and pages and len(events) < most and _oldest_ms(events) >= back_to_ms:
            pages -= 1
            limit = min(PAGE_LIMIT, most - len(events))
            try:
                page, before = await self.mx.earlier(room_id, before, limit, CATCH_UP_TYPES)
            except HomeserverError as e:
                self.log.warning("Paging back the cut timeline of %s failed: %s", room_id, e)
                break
            known = {e.get("event_id") for e in events if isinstance(e, dict)}
            new = [e for e in page if isinstance(e.get("event_id"), str) and e["event_id"] not in known]
            if not new:
                break  # nothing new: the room's start, or a homeserver going round
            events[:0] = new
        if before and len(events) >= most:
            self.log.warning(
                "Caught up only the newest %d events of %s (reconcile.catch_up_max_events)",
                len(events), room_id,
            )  # fmt: skip

    def queue(self, plan: StartPlan) -> None:
        """Puts a start's events at the head of their rooms' queues, before anything that
        arrived during the start; nothing is awaited, so it happens whole or not at all."""
        for room_id, items in plan.rooms.items():
            for incoming in items:
                self.log.info("Catching up %s in %s", incoming.event_id, room_id)
            self.queues.worker(room_id).push_start(list(items))
        self.log.info("Caught up %d message(s) sent while the bot was away", plan.count)

    async def recent_of(self, room_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """The newest events of rooms with an answer under way when the plugin stopped, to
        find whether it finished (its answer names it) or which event to finish."""
        found = {}
        for room_id in room_ids:
            try:
                found[room_id] = await self.mx.recent(room_id, TIMELINE_LIMIT)
            except HomeserverError as e:
                self.log.warning("Reading the recent events of %s failed: %s", room_id, e)
        await self.mx.crypto.open_all(found)
        return found
