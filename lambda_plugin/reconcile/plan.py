"""The plan of a reconciliation: a pure function of what was read and the database's rows.

``plan()`` is made of named phases, so it is tested and benchmarked without a homeserver
(how the rooms are read: the package's docstring); ``Reconciler.run()`` applies the plan. It
never creates a room or a Space; it writes missing plugin state and links into rooms the bot
already manages, and a second run on a consistent database writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any, cast

from ..db import ChatRoomRow, UserRow, chat_number
from ..marker import KIND_CHAT, KIND_SPACE, MARKER_TYPE, Marker
from ..roomstate import (
    NO_GUESTS,
    RoomState,
    adopted_platform_chat_id,
    parse_room,
    space_child,
    space_parent,
)
from .report import Plan, Write, without_gc


@dataclass(slots=True)
class Numbered:
    """One owner's chat rooms, numbered: (room, row, whether the bot's marker is written) in
    age order, the index the owner's next chat gets, and the contradictions met."""

    rows: list[tuple[RoomState, ChatRoomRow, bool]] = field(default_factory=list)
    next_index: int = 1
    conflicts: int = 0


def parse_rooms(
    states: dict[str, RoomState] | dict[str, list[dict[str, Any]]], bot_id: str
) -> dict[str, RoomState]:
    """Every room as a RoomState: read_topology parses as it reads (its dict is taken as
    it is: a copy of 100k entries was a tenth of a plan), tests hand in events."""
    if all(isinstance(value, RoomState) for value in states.values()):
        return cast(dict[str, RoomState], states)  # each value is one: checked above
    return {
        room_id: value if isinstance(value, RoomState) else parse_room(room_id, value, bot_id)
        for room_id, value in states.items()
    }


def trusted(room: RoomState, bot_id: str) -> bool:
    """Made and marked by the bot, and not replaced by an upgrade."""
    return room.marker is not None and room.creator == bot_id and not room.tombstoned


def _by_age(rooms: dict[str, RoomState]) -> list[RoomState]:
    # Oldest first (room id breaks ties): every run resolves contradictions the same way.
    return sorted(rooms.values(), key=lambda r: (r.created_ts, r.room_id))


def restore_markers(
    rooms: dict[str, RoomState],
    bot_id: str,
    known_users: dict[str, UserRow],
    known_rooms: dict[str, ChatRoomRow],
) -> dict[str, RoomState]:
    """The rooms, with the markers the bot sent but that were emptied (redacted) taken back
    from the database where it knows the room: a chat keeps its row (number and
    platform_chat_id), a Space stays its user's. ``marker_emptied`` stays set: the marker is
    written again. Rooms the database does not know stay unmarked."""
    emptied = [r for r in rooms.values() if r.marker_emptied and r.creator == bot_id]
    if not emptied:
        return rooms
    space_owner = {u.space_id: u.user_id for u in known_users.values() if u.space_id}
    restored: dict[str, RoomState] = {}
    for room in emptied:
        marker: Marker | None = None
        known = known_rooms.get(room.room_id)
        if room.is_space and room.room_id in space_owner:
            marker = Marker(KIND_SPACE, space_owner[room.room_id])
        elif not room.is_space and known is not None:
            user = known_users.get(known.user_id)
            marker = Marker.for_chat(known, user.space_id if user else None)
        if marker is not None:
            restored[room.room_id] = replace(room, marker=marker)
    return {**rooms, **restored}


def pick_spaces(
    rooms: dict[str, RoomState], bot_id: str, known_users: dict[str, UserRow]
) -> tuple[dict[str, RoomState], int]:
    """Each owner's one Space, by owner, and the conflicts met: when the bot's markers name
    two Spaces of one owner, the database's choice wins, else the oldest."""
    spaces: dict[str, RoomState] = {}
    conflicts = 0
    for room in _by_age(rooms):
        marker = room.marker
        if marker is None or marker.kind != KIND_SPACE or not room.is_space:
            continue
        if not trusted(room, bot_id):
            continue
        if marker.owner in spaces:
            conflicts += 1
            known = known_users.get(marker.owner)
            if known and known.space_id == room.room_id:
                spaces[marker.owner] = room
            continue
        spaces[marker.owner] = room
    return spaces, conflicts


def child_owners(spaces: dict[str, RoomState]) -> dict[str, str]:
    """Child room -> owner of the managed Space listing it (the first, by Space id): one
    pass, so finding the Space of an unmarked room costs no scan of every Space."""
    owners: dict[str, str] = {}
    for owner, space in sorted(spaces.items(), key=lambda item: item[1].room_id):
        for child_id in space.children:
            owners.setdefault(child_id, owner)
    return owners


def find_chats(
    rooms: dict[str, RoomState],
    bot_id: str,
    spaces: dict[str, RoomState],
    child_owner: dict[str, str],
) -> tuple[dict[str, list[RoomState]], int]:
    """Each owner's chat rooms, oldest first, and how many rooms are not the plugin's: the
    bot's marked rooms, and unmarked rooms the bot made that a managed Space lists (made by
    an older version, adopted). An entry without a marker is to be adopted."""
    space_owner = {space.room_id: owner for owner, space in spaces.items()}
    chats: dict[str, list[RoomState]] = {}
    skipped = 0
    for room in _by_age(rooms):
        if room.room_id in space_owner or room.is_space:
            continue
        marker = room.marker
        if marker is not None and marker.kind == KIND_CHAT and trusted(room, bot_id):
            chats.setdefault(marker.owner, []).append(room)
            continue
        owner = _claimed_owner(room, spaces, space_owner) or child_owner.get(room.room_id)
        if owner and marker is None and room.creator == bot_id and not room.tombstoned:
            chats.setdefault(owner, []).append(room)
        else:
            skipped += 1
    return chats, skipped


def _claimed_owner(
    room: RoomState, spaces: dict[str, RoomState], space_owner: dict[str, str]
) -> str | None:
    """The owner of the managed Space the room names as parent, where that Space lists it."""
    for space_id in sorted(room.parents):
        owner = space_owner.get(space_id)
        if owner is not None and room.room_id in spaces[owner].children:
            return owner
    return None


@dataclass(slots=True)
class _Numbering:
    """What numbering every owner's rooms shares: platform_chat_ids are unique across all."""

    known_rooms: dict[str, ChatRoomRow]
    default_agent: str
    now: int
    seen_pcids: set[str] = field(default_factory=set)

    def row(self, room: RoomState, owner: str, number: int, pcid: str, name: str) -> ChatRoomRow:
        marker = room.marker
        return ChatRoomRow(
            room_id=room.room_id,
            user_id=owner,
            chat_id=f"C{number}",
            name=name,
            agent_id=(marker.agent_id if marker else None) or self.default_agent,
            platform_chat_id=pcid,
            archived=bool(marker.archived) if marker else False,
            gone=False,
            created_at=room.created_ts or self.now,
        )


def number_chats(
    chats: dict[str, list[RoomState]],
    spaces: dict[str, RoomState],
    known_users: dict[str, UserRow],
    known_rooms: dict[str, ChatRoomRow],
    default_agent: str,
    now: int,
) -> dict[str, Numbered]:
    """Rows for every owner with a Space or a chat, by owner (sorted): marked rooms keep the
    number their marker says; rooms whose number is invalid or taken, and unmarked ones, get
    new numbers past every number the owner has had, in Matrix or in the database (a room
    the bot was removed from keeps its number). A platform_chat_id met twice, across owners
    too, is a conflict: the later room gets its deterministic one."""
    highest: dict[str, int] = {}
    for known in known_rooms.values():
        highest[known.user_id] = max(highest.get(known.user_id, 0), known.chat_number)
    shared = _Numbering(known_rooms, default_agent, now)
    numbered: dict[str, Numbered] = {}
    for owner in sorted(set(spaces) | set(chats)):
        known_user = known_users.get(owner)
        floor = max(highest.get(owner, 0), known_user.next_chat_index - 1 if known_user else 0)
        space = spaces.get(owner)
        space_id = space.room_id if space else None
        numbered[owner] = _number_owner(owner, chats.get(owner, []), space_id, floor, shared)
    return numbered


def _number_owner(
    owner: str, rooms: list[RoomState], space_id: str | None, floor: int, shared: _Numbering
) -> Numbered:
    out = Numbered()
    taken: set[int] = set()
    adopt: list[RoomState] = []
    for room in rooms:
        marker = room.marker
        number = chat_number(marker.chat_id or "") if marker else 0
        if marker is None or number <= 0 or number in taken:
            out.conflicts += marker is not None
            adopt.append(room)  # numbered below, with a fresh marker
            continue
        pcid = marker.platform_chat_id or adopted_platform_chat_id(room.room_id)
        rewrite = pcid in shared.seen_pcids
        if rewrite:
            out.conflicts += 1
            pcid = adopted_platform_chat_id(room.room_id)
        taken.add(number)
        shared.seen_pcids.add(pcid)
        name = room.name or _known_name(shared.known_rooms, room.room_id, number)
        moved = space_id is not None and marker.space_id != space_id
        write = rewrite or moved or room.marker_emptied
        out.rows.append((room, shared.row(room, owner, number, pcid, name), write))
    next_free = 1 + max(max(taken, default=0), floor)
    for room in adopt:
        pcid = adopted_platform_chat_id(room.room_id)
        if room.marker and room.marker.platform_chat_id not in shared.seen_pcids:
            pcid = room.marker.platform_chat_id or pcid
        shared.seen_pcids.add(pcid)
        name = room.name or f"C{next_free}"
        out.rows.append((room, shared.row(room, owner, next_free, pcid, name), True))
        next_free += 1
    out.next_index = next_free  # past every number seen, never below the stored counter
    return out


def _known_name(known_rooms: dict[str, ChatRoomRow], room_id: str, number: int) -> str:
    known = known_rooms.get(room_id)
    return known.name if known else f"C{number}"


def user_row(
    owner: str, space_id: str | None, next_index: int, known: UserRow | None, now: int
) -> UserRow | None:
    """The owner's row when the database's is missing or differs; None when it is right. A
    Space not found in Matrix this time is not forgotten."""
    space_id = space_id or (known.space_id if known else None)
    if known and known.space_id == space_id and known.next_chat_index == next_index:
        return None
    return UserRow(owner, space_id, next_index, now)


def diff_rows(
    rows: list[ChatRoomRow], known_rooms: dict[str, ChatRoomRow]
) -> tuple[dict[str, ChatRoomRow], dict[str, ChatRoomRow]]:
    """The rows the database misses, and those it holds otherwise (keeping its created_at)."""
    missing: dict[str, ChatRoomRow] = {}
    differing: dict[str, ChatRoomRow] = {}
    for row in rows:
        known = known_rooms.get(row.room_id)
        if known is None:
            missing[row.room_id] = row
        elif replace(known, created_at=row.created_at) != row:
            differing[row.room_id] = replace(row, created_at=known.created_at)
    return missing, differing


def link_writes(space: RoomState, room: RoomState, row: ChatRoomRow, server: str) -> list[Write]:
    """Links to repair: an active room is listed in its Space (with via), an archived one is
    not, and every room points back to its Space."""
    writes: list[Write] = []
    listed = space.children.get(row.room_id, False)
    if not row.archived and not listed:
        content = space_child(server, row.chat_number)
        writes.append((space.room_id, "m.space.child", row.room_id, content))
    elif row.archived and listed:
        writes.append((space.room_id, "m.space.child", row.room_id, {}))
    if not room.parents.get(space.room_id, False):
        writes.append((row.room_id, "m.space.parent", space.room_id, space_parent(server)))
    return writes


def _managed(spaces: dict[str, RoomState], numbered: dict[str, Numbered]) -> list[RoomState]:
    """The Spaces and chat rooms the plugin manages."""
    return [*spaces.values(), *(room for n in numbered.values() for room, _, _ in n.rows)]


def power_writes(spaces: dict[str, RoomState], numbered: dict[str, Numbered]) -> list[Write]:
    """Corrected power levels for the Spaces and chat rooms the plugin manages whose levels
    let users redact or send its state (rooms made before redaction moved up)."""
    return [
        (room.room_id, "m.room.power_levels", "", room.power_levels_fix)
        for room in _managed(spaces, numbered)
        if room.power_levels_fix is not None
    ]


def guest_writes(spaces: dict[str, RoomState], numbered: dict[str, Numbered]) -> list[Write]:
    """Guest access forbidden in the Spaces and chat rooms the plugin manages that are open
    to guests (made before rooms were made closed: the private_chat preset opens them)."""
    return [
        (room.room_id, "m.room.guest_access", "", dict(NO_GUESTS))
        for room in _managed(spaces, numbered)
        if room.guests_open
    ]


def gone_rooms(
    rooms: dict[str, RoomState],
    known_rooms: dict[str, ChatRoomRow],
    unread: Collection[str] = frozenset(),
) -> dict[str, ChatRoomRow]:
    """Rows of rooms the bot is no longer in (kicked while it was down) or that were
    upgraded, marked gone. A joined room whose read failed (``unread``) is not gone: it
    keeps its row until it is read."""
    gone: dict[str, ChatRoomRow] = {}
    for room_id, known in known_rooms.items():
        room = rooms.get(room_id)
        if room is None and room_id in unread:
            continue
        if (room is None or room.tombstoned) and not known.gone:
            gone[room_id] = replace(known, gone=True)
    return gone


@without_gc()
def plan(
    states: dict[str, RoomState] | dict[str, list[dict[str, Any]]],
    bot_id: str,
    server: str,
    known_users: dict[str, UserRow],
    known_rooms: dict[str, ChatRoomRow],
    default_agent: str,
    unread: Collection[str] = frozenset(),
) -> Plan:
    """What reconciliation writes, from the rooms read, the joined rooms whose read failed
    (``unread``: nothing is written for them, their rows stay as they are) and the
    database's rows: the phases above, composed. No I/O; linear in the rooms (bar sorts)."""
    result = Plan()
    report = result.report
    now = int(time.time() * 1000)
    rooms = parse_rooms(states, bot_id)
    report.unreadable_rooms = sorted(set(unread) - rooms.keys())
    report.joined_rooms = len(rooms) + len(report.unreadable_rooms)
    rooms = restore_markers(rooms, bot_id, known_users, known_rooms)
    spaces, report.conflicts = pick_spaces(rooms, bot_id, known_users)
    chats, report.skipped_rooms = find_chats(rooms, bot_id, spaces, child_owners(spaces))
    numbered = number_chats(chats, spaces, known_users, known_rooms, default_agent, now)
    for owner, chats_of in numbered.items():
        space = spaces.get(owner)
        space_id = space.room_id if space else None
        report.conflicts += chats_of.conflicts
        user = user_row(owner, space_id, chats_of.next_index, known_users.get(owner), now)
        if user is not None:
            result.users[owner] = user
            report.restored_user_meta += 1
        _owner_writes(result, owner, chats_of.rows, space, known_rooms, server)
    levels = power_writes(spaces, numbered)
    result.state_writes.extend(levels)
    report.repaired_power_levels = len(levels)
    guests = guest_writes(spaces, numbered)
    result.state_writes.extend(guests)
    report.repaired_guest_access = len(guests)
    gone = gone_rooms(rooms, known_rooms, unread)
    result.rooms.update(gone)
    report.gone_rooms = len(gone)
    report.writes = len(result.users) + len(result.rooms) + len(result.state_writes)
    return result


def _owner_writes(
    result: Plan,
    owner: str,
    rows: list[tuple[RoomState, ChatRoomRow, bool]],
    space: RoomState | None,
    known_rooms: dict[str, ChatRoomRow],
    server: str,
) -> None:
    """Adds one owner's rows, markers and links to the plan."""
    report = result.report
    if space is not None and space.marker_emptied:
        content = Marker(KIND_SPACE, owner).content()
        result.state_writes.append((space.room_id, MARKER_TYPE, "", content))
        report.restored_room_meta += 1
    missing, differing = diff_rows([row for _, row, _ in rows], known_rooms)
    result.rooms.update(missing)
    result.rooms.update(differing)
    report.restored_chat_rows += len(missing)
    report.repaired_chat_rows += len(differing)
    space_id = space.room_id if space else None
    for room, row, write_marker in rows:
        if write_marker:
            content = Marker.for_chat(row, space_id).content()
            result.state_writes.append((row.room_id, MARKER_TYPE, "", content))
            report.restored_room_meta += 1
        if space is not None:
            links = link_writes(space, room, row, server)
            result.state_writes.extend(links)
            report.repaired_links += len(links)
