"""Rebuilds the database from the rooms themselves: Matrix topology is the truth.

The topology is read with one ``/joined_rooms`` and bounded concurrent ``/state`` reads. (A filtered full-state ``/sync`` would be one request,
but Synapse's answer with a short timeline leaves out the newest state events, such as the
last ``m.space.child`` of a Space, so it cannot be trusted.) ``plan()`` is a pure function of
what was read and the database's rows, so it is tested and benchmarked without a homeserver;
``Reconciler.run()`` applies the plan. It never
creates a room or a Space; it writes missing plugin state and links into rooms the bot
already manages, and a second run on a consistent database writes nothing.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .db import UNIQUE_VIOLATION, ChatRoomRow, UserRow, chat_number
from .marker import KIND_CHAT, KIND_SPACE, MARKER_TYPE, Marker
from .matrix import HomeserverError
from .roomstate import space_child, space_parent

if TYPE_CHECKING:
    from .bot import LambdaBot

STATE_TYPES = [
    MARKER_TYPE,
    "m.room.create",
    "m.room.name",
    "m.room.tombstone",
    "m.space.child",
    "m.space.parent",
]


READ_CONCURRENCY = 32


_WANTED = frozenset(STATE_TYPES)


@dataclass
class Report:
    joined_rooms: int = 0
    restored_user_meta: int = 0  # user rows written (missing or different)
    restored_room_meta: int = 0  # plugin markers written into rooms (backfill, fixes)
    restored_chat_rows: int = 0  # chat rows that were missing from the database
    repaired_chat_rows: int = 0  # chat rows that differed from the rooms
    skipped_rooms: int = 0  # joined rooms that are not the plugin's
    conflicts: int = 0  # contradictions resolved deterministically (see log)
    repaired_links: int = 0  # m.space.child / m.space.parent written
    gone_rooms: int = 0  # rooms in the database the bot is no longer in
    invites: int = 0  # pending invites handed to onboarding
    writes: int = 0  # every write, database and homeserver
    requests: int = 0  # homeserver requests made
    seconds: float = 0.0
    dry_run: bool = False

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items())

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["seconds"] = round(self.seconds, 3)
        return data


@dataclass(slots=True)
class RoomState:
    """What reconciliation reads of one room: kept small, one per joined room."""

    room_id: str
    creator: str | None = None
    created_ts: int = 0
    is_space: bool = False
    name: str | None = None
    tombstoned: bool = False
    marker: Marker | None = None
    children: dict[str, bool] = field(default_factory=dict)  # child room -> listed with via
    parents: dict[str, bool] = field(default_factory=dict)  # parent Space -> with via


@dataclass
class Plan:
    users: dict[str, UserRow] = field(default_factory=dict)
    rooms: dict[str, ChatRoomRow] = field(default_factory=dict)
    # (room id, event type, state key, content): state the bot writes into its own rooms
    state_writes: list[tuple[str, str, str, dict]] = field(default_factory=list)
    report: Report = field(default_factory=Report)


def parse_room(room_id: str, events: list[dict[str, Any]], bot_id: str) -> RoomState:
    room = RoomState(room_id)
    for event in events:
        etype = event.get("type")
        if etype not in _WANTED:
            continue  # most of a room's state: skipped before anything else is looked at
        key, content = event.get("state_key"), event.get("content")
        if not isinstance(content, dict):
            continue
        if etype == "m.room.create":
            room.creator = content.get("creator") or event.get("sender")
            room.created_ts = int(event.get("origin_server_ts") or 0)
            room.is_space = content.get("type") == "m.space"
        elif etype == "m.room.name":
            room.name = content.get("name") if isinstance(content.get("name"), str) else None
        elif etype == "m.room.tombstone":
            room.tombstoned = bool(content.get("replacement_room"))
        elif etype == MARKER_TYPE and key == "" and event.get("sender") == bot_id:
            # Only the bot's own marker counts; anyone else's is ignored.
            room.marker = Marker.from_content(content)
        elif etype == "m.space.child" and isinstance(key, str):
            room.children[key] = bool(content.get("via"))
        elif etype == "m.space.parent" and isinstance(key, str):
            room.parents[key] = bool(content.get("via"))
    return room


def adopted_platform_chat_id(room_id: str) -> str:
    """Deterministic: the same room always gets the same id, whichever run adopts it."""
    return "mx-" + hashlib.sha256(room_id.encode()).hexdigest()[:32]


@contextmanager
def _without_gc() -> Iterator[None]:
    """Pauses the cyclic garbage collector: building tens of thousands of rows makes it run
    full collections over an ever larger heap, which turns linear work quadratic. Nothing
    made here is cyclic; the pause lasts one plan."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_without_gc()
def plan(
    states: dict[str, RoomState] | dict[str, list[dict[str, Any]]],
    bot_id: str,
    server: str,
    known_users: dict[str, UserRow],
    known_rooms: dict[str, ChatRoomRow],
    default_agent: str,
) -> Plan:
    result = Plan()
    report = result.report
    rooms = {
        room_id: value if isinstance(value, RoomState) else parse_room(room_id, value, bot_id)
        for room_id, value in states.items()
    }
    report.joined_rooms = len(rooms)
    now = int(time.time() * 1000)

    def trusted(room: RoomState) -> bool:
        return room.marker is not None and room.creator == bot_id and not room.tombstoned

    # Spaces: one per owner; on a conflict the database's choice wins, else the oldest.
    spaces: dict[str, RoomState] = {}
    for room in sorted(rooms.values(), key=lambda r: (r.created_ts, r.room_id)):
        if not (trusted(room) and room.marker.kind == KIND_SPACE and room.is_space):
            continue
        owner = room.marker.owner
        if owner in spaces:
            report.conflicts += 1
            known = known_users.get(owner)
            if known and known.space_id == room.room_id:
                spaces[owner] = room
            continue
        spaces[owner] = room
    space_owner = {space.room_id: owner for owner, space in spaces.items()}
    # Which managed Space lists a room as its child (the first, by Space id): one pass,
    # so finding the Space of an unmarked room costs no scan of every Space.
    child_owner: dict[str, str] = {}
    for space_id, owner in sorted(space_owner.items()):
        for child_id in rooms[space_id].children:
            child_owner.setdefault(child_id, owner)

    # Chat rooms: marked ones, then unmarked children of a managed Space (older versions).
    chats: dict[str, list[tuple[RoomState, Marker, bool]]] = {}
    for room in sorted(rooms.values(), key=lambda r: (r.created_ts, r.room_id)):
        if room.room_id in space_owner or room.is_space:
            continue
        if trusted(room) and room.marker.kind == KIND_CHAT:
            chats.setdefault(room.marker.owner, []).append((room, room.marker, False))
            continue
        parent = next(
            (
                space_owner[s]
                for s in sorted(room.parents)
                if s in space_owner and room.room_id in rooms[s].children
            ),
            None,
        )
        parent = parent or child_owner.get(room.room_id)
        if parent and room.creator == bot_id and not room.tombstoned and room.marker is None:
            chats.setdefault(parent, []).append((room, None, True))  # type: ignore[arg-type]
        else:
            report.skipped_rooms += 1

    known_numbers: dict[str, set[int]] = {}
    for known in known_rooms.values():
        known_numbers.setdefault(known.user_id, set()).add(known.chat_number)
    seen_pcids: set[str] = set()
    owners = set(spaces) | set(chats)
    for owner in sorted(owners):
        space = spaces.get(owner)
        space_id = space.room_id if space else None
        taken: set[int] = set()
        rows: list[tuple[RoomState, ChatRoomRow, bool]] = []
        adopt: list[RoomState] = []
        for room, marker, unmarked in chats.get(owner, []):
            if unmarked:
                adopt.append(room)
                continue
            number = chat_number(marker.chat_id or "")
            pcid = marker.platform_chat_id or adopted_platform_chat_id(room.room_id)
            rewrite = False
            if number <= 0 or number in taken:
                report.conflicts += 1
                adopt.append(room)  # renumbered below, with a fresh marker
                continue
            if pcid in seen_pcids:
                report.conflicts += 1
                pcid = adopted_platform_chat_id(room.room_id)
                rewrite = True
            taken.add(number)
            seen_pcids.add(pcid)
            row = ChatRoomRow(
                room_id=room.room_id,
                user_id=owner,
                chat_id=f"C{number}",
                name=room.name or _known_name(known_rooms, room.room_id, number),
                agent_id=marker.agent_id or default_agent,
                platform_chat_id=pcid,
                archived=marker.archived,
                gone=False,
                created_at=room.created_ts or now,
            )
            moved = space_id is not None and marker.space_id != space_id
            rows.append((room, row, rewrite or moved))
        # New numbers go past every number this user has had, in Matrix or in the database
        # (a room the bot was removed from keeps its number).
        known_user = known_users.get(owner)
        next_free = 1 + max(
            max(taken, default=0),
            max(known_numbers.get(owner, ()), default=0),
            (known_user.next_chat_index - 1) if known_user else 0,
        )
        for room in adopt:
            pcid = adopted_platform_chat_id(room.room_id)
            if room.marker and room.marker.platform_chat_id not in seen_pcids:
                pcid = room.marker.platform_chat_id or pcid
            seen_pcids.add(pcid)
            row = ChatRoomRow(
                room_id=room.room_id,
                user_id=owner,
                chat_id=f"C{next_free}",
                name=room.name or f"C{next_free}",
                agent_id=(room.marker.agent_id if room.marker else None) or default_agent,
                platform_chat_id=pcid,
                archived=bool(room.marker.archived) if room.marker else False,
                gone=False,
                created_at=room.created_ts or now,
            )
            taken.add(next_free)
            next_free += 1
            rows.append((room, row, True))

        next_index = next_free  # past every number seen, and never below the stored counter
        user = UserRow(
            owner, space_id or (known_user.space_id if known_user else None), next_index, now
        )
        if (
            known_user is None
            or known_user.space_id != user.space_id
            or known_user.next_chat_index != next_index
        ):
            result.users[owner] = user
            report.restored_user_meta += 1

        for room, row, write_marker in rows:
            known = known_rooms.get(row.room_id)
            if known is None:
                result.rooms[row.room_id] = row
                report.restored_chat_rows += 1
            elif replace(known, created_at=row.created_at) != row:
                result.rooms[row.room_id] = replace(row, created_at=known.created_at)
                report.repaired_chat_rows += 1
            if write_marker:
                marker = Marker.for_chat(row, space_id)
                result.state_writes.append((row.room_id, MARKER_TYPE, "", marker.content()))
                report.restored_room_meta += 1
            if space is None:
                continue
            # Links: active rooms are listed in the Space (with via) and point back to it.
            listed = space.children.get(row.room_id, False)
            if not row.archived and not listed:
                content = space_child(server, row.chat_number)
                result.state_writes.append((space.room_id, "m.space.child", row.room_id, content))
                report.repaired_links += 1
            elif row.archived and listed:
                result.state_writes.append((space.room_id, "m.space.child", row.room_id, {}))
                report.repaired_links += 1
            if not room.parents.get(space.room_id, False):
                content = space_parent(server)
                result.state_writes.append((row.room_id, "m.space.parent", space.room_id, content))
                report.repaired_links += 1

    # Rooms the database knows but the bot is no longer in (kicked while it was down).
    for room_id, known in known_rooms.items():
        left = room_id not in rooms or rooms[room_id].tombstoned
        if left and not known.gone:
            result.rooms[room_id] = replace(known, gone=True)
            report.gone_rooms += 1
    report.writes = len(result.users) + len(result.rooms) + len(result.state_writes)
    return result


def _known_name(known_rooms: dict[str, ChatRoomRow], room_id: str, number: int) -> str:
    known = known_rooms.get(room_id)
    return known.name if known else f"C{number}"


class Reconciler:
    def __init__(self, bot: LambdaBot) -> None:
        self.bot = bot
        self.last_report: Report | None = None
        self.unreadable = 0

    async def run(self, dry_run: bool = False) -> Report:
        """Reconciles once; returns the report."""
        started = time.monotonic()
        requests_before = self.bot.mx.requests
        registry = self.bot.registry
        # What the plugin knew before reading the rooms: a row that changes while they are
        # read (a !clear, a rename) is newer than what was read, and is left alone.
        known_users, known_rooms = dict(registry.users), dict(registry.rooms)
        states = await self.read_topology()
        result = plan(
            states,
            self.bot.mx.user_id,
            self.bot.mx.server_name,
            known_users,
            known_rooms,
            self.bot.settings.default_agent,
        )
        report = result.report
        report.skipped_rooms += self.unreadable
        report.dry_run = dry_run
        if not dry_run:
            await self._apply(result, known_rooms)
        report.requests = self.bot.mx.requests - requests_before
        report.seconds = time.monotonic() - started
        self.last_report = report
        return report

    async def read_topology(self) -> dict[str, RoomState]:
        """Every joined room's state, parsed as it arrives (only what reconciliation reads
        is kept). Pending invites come with the catch-up /sync after the start."""
        mx = self.bot.mx
        room_ids = await mx.joined_rooms()
        limit = asyncio.Semaphore(READ_CONCURRENCY)
        states: dict[str, RoomState] = {}
        unreadable: list[str] = []

        async def read(room_id: str) -> None:
            async with limit:
                try:
                    events = await mx.state(room_id)
                except HomeserverError as e:
                    if e.status == 0:
                        raise  # the homeserver is unreachable: the whole run is retried
                    # One room that can't be read (left meanwhile, or broken) must not keep
                    # the plugin from starting: it is skipped this time and logged.
                    self.bot.log.warning("Reconciliation skips %s: %s", room_id, e)
                    unreadable.append(room_id)
                    return
            states[room_id] = parse_room(room_id, events, mx.user_id)

        await asyncio.gather(*(read(room_id) for room_id in room_ids))
        self.unreadable = len(unreadable)
        return states

    async def _apply(self, result: Plan, known_rooms: dict[str, ChatRoomRow]) -> None:
        store = self.bot.store
        registry = self.bot.registry
        changed = {
            room_id
            for room_id in result.rooms
            if registry.rooms.get(room_id) is not known_rooms.get(room_id)
        }
        await store.upsert_users(list(result.users.values()))
        # Rooms changed by a command during this run are newer than what was read: left alone.
        rooms = [r for r in result.rooms.values() if r.room_id not in changed]
        try:
            await store.upsert_rooms(rooms)  # one transaction: thousands of rows in one go
        except UNIQUE_VIOLATION:
            # A contradiction the plan could not see (rows it did not know): row by row, so
            # only that room is left as it was and the start goes on.
            for room in rooms:
                try:
                    await store.upsert_room(room)
                except UNIQUE_VIOLATION as e:
                    result.report.conflicts += 1
                    self.bot.log.warning("Reconciliation could not write %s: %s", room.room_id, e)
        for room_id, event_type, state_key, content in result.state_writes:
            if room_id in changed and event_type == MARKER_TYPE:
                continue
            self.bot.log.debug(
                "Reconciliation writes %s/%s into %s", event_type, state_key, room_id
            )
            try:
                await self.bot.mx.send_state(room_id, event_type, content, state_key)
            except HomeserverError as e:
                self.bot.log.warning(
                    "Reconciliation could not write %s into %s: %s", event_type, room_id, e
                )
        await self.bot.registry.load()
