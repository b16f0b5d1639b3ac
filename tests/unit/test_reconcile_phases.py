"""The phases reconcile.plan() is made of, each on its own, and the Reconciler on fakes."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from lambda_plugin.db import ChatRoomRow, UserRow
from lambda_plugin.marker import KIND_CHAT, KIND_SPACE, MARKER_TYPE, Marker
from lambda_plugin.matrix import HomeserverError
from lambda_plugin.reconcile import (
    BATCHES_AT_ONCE,
    Reconciler,
    adopted_platform_chat_id,
    child_owners,
    diff_rows,
    find_chats,
    gone_rooms,
    link_writes,
    number_chats,
    parse_rooms,
    pick_spaces,
    power_writes,
    restore_markers,
    user_row,
)
from lambda_plugin.reconcile.report import Plan
from lambda_plugin.roomstate import RoomState

BOT = "@bot:hs"
ANN = "@ann:hs"
BOB = "@bob:hs"


def space(room_id: str, owner: str, ts: int = 1, children: tuple[str, ...] = ()) -> RoomState:
    return RoomState(
        room_id,
        creator=BOT,
        created_ts=ts,
        is_space=True,
        marker=Marker(KIND_SPACE, owner),
        children=dict.fromkeys(children, True),
    )


def chat(
    room_id: str,
    owner: str = ANN,
    chat_id: str = "C1",
    pcid: str = "p1",
    ts: int = 2,
    space_id: str | None = "!s",
    **extra: Any,
) -> RoomState:
    marker = Marker(KIND_CHAT, owner, space_id, chat_id, "echo", pcid)
    return RoomState(room_id, creator=BOT, created_ts=ts, marker=marker, **extra)


def by_id(*rooms: RoomState) -> dict[str, RoomState]:
    return {room.room_id: room for room in rooms}


def row(room_id: str, owner: str = ANN, chat_id: str = "C1", **changes: Any) -> ChatRoomRow:
    base = ChatRoomRow(room_id, owner, chat_id, chat_id, "echo", "p1", False, False, 2)
    return replace(base, **changes)


# parse_rooms


def test_parse_rooms_takes_parsed_rooms_and_raw_events_alike() -> None:
    parsed = RoomState("!a", creator=BOT)
    raw = [{"type": "m.room.create", "state_key": "", "sender": BOT, "content": {}}]
    rooms = parse_rooms({"!a": parsed, "!b": raw}, BOT)  # type: ignore[dict-item]
    assert rooms["!a"] is parsed
    assert rooms["!b"].creator == BOT and rooms["!b"].room_id == "!b"


# restore_markers


def test_restore_markers_takes_emptied_markers_back_from_the_database() -> None:
    emptied_space = replace(space("!s", ANN), marker=None, marker_emptied=True)
    emptied_chat = replace(chat("!c"), marker=None, marker_emptied=True)
    unknown = replace(chat("!u"), marker=None, marker_emptied=True)
    intact = chat("!i", chat_id="C2")
    rooms = by_id(emptied_space, emptied_chat, unknown, intact)
    known_users = {ANN: UserRow(ANN, "!s", 3, 1)}
    known_row = row("!c", chat_id="C7", platform_chat_id="kept")
    restored = restore_markers(rooms, BOT, known_users, {"!c": known_row})
    assert restored["!s"].marker == Marker(KIND_SPACE, ANN)
    assert restored["!c"].marker == Marker.for_chat(known_row, "!s")
    assert restored["!s"].marker_emptied and restored["!c"].marker_emptied  # to be rewritten
    assert restored["!u"] is unknown and restored["!i"] is intact
    assert list(restored) == list(rooms) and rooms["!c"].marker is None  # input untouched


def test_restore_markers_leaves_rooms_the_bot_did_not_make() -> None:
    foreign = replace(chat("!c"), creator=ANN, marker=None, marker_emptied=True)
    rooms = by_id(foreign)
    assert restore_markers(rooms, BOT, {}, {"!c": row("!c")}) is rooms


def test_restore_markers_keeps_a_space_only_for_the_user_the_database_names() -> None:
    emptied = replace(space("!s", ANN), marker=None, marker_emptied=True)
    as_chat = replace(chat("!s"), marker=None, marker_emptied=True)  # not a Space
    elsewhere = {ANN: UserRow(ANN, "!other", 3, 1)}
    here = {ANN: UserRow(ANN, "!s", 3, 1)}
    assert restore_markers(by_id(emptied), BOT, elsewhere, {})["!s"].marker is None
    assert restore_markers(by_id(as_chat), BOT, here, {})["!s"].marker is None


# pick_spaces


def test_pick_spaces_gives_each_owner_the_oldest_space() -> None:
    rooms = by_id(space("!new", ANN, ts=5), space("!old", ANN, ts=3), space("!b", BOB))
    spaces, conflicts = pick_spaces(rooms, BOT, {})
    assert {o: s.room_id for o, s in spaces.items()} == {ANN: "!old", BOB: "!b"}
    assert conflicts == 1


def test_pick_spaces_lets_the_database_choice_win() -> None:
    rooms = by_id(space("!new", ANN, ts=5), space("!old", ANN, ts=3))
    spaces, conflicts = pick_spaces(rooms, BOT, {ANN: UserRow(ANN, "!new", 1, 1)})
    assert spaces[ANN].room_id == "!new" and conflicts == 1


def test_pick_spaces_ignores_untrusted_and_non_space_rooms() -> None:
    foreign = replace(space("!foreign", ANN), creator=ANN)
    tombstoned = replace(space("!tomb", ANN), tombstoned=True)
    not_a_space = replace(space("!room", ANN), is_space=False)
    unmarked = replace(space("!bare", ANN), marker=None)
    chat_marked = replace(space("!chat", ANN), marker=chat("!x").marker)
    rooms = by_id(foreign, tombstoned, not_a_space, unmarked, chat_marked)
    assert pick_spaces(rooms, BOT, {}) == ({}, 0)


# child_owners


def test_child_owners_maps_each_child_to_the_first_space_by_id() -> None:
    spaces = {
        ANN: space("!s2", ANN, children=("!c", "!a")),
        BOB: space("!s1", BOB, children=("!c",)),
    }
    assert child_owners(spaces) == {"!c": BOB, "!a": ANN}


# find_chats


def test_find_chats_groups_marked_rooms_by_owner_oldest_first() -> None:
    rooms = by_id(chat("!late", ts=9), chat("!early", ts=1), chat("!bob", BOB))
    chats, skipped = find_chats(rooms, BOT, {}, {})
    assert [r.room_id for r in chats[ANN]] == ["!early", "!late"]
    assert [r.room_id for r in chats[BOB]] == ["!bob"] and skipped == 0


def test_find_chats_adopts_unmarked_rooms_of_a_managed_space_only() -> None:
    managed = space("!s", ANN, children=("!listed", "!theirs"))
    listed = RoomState("!listed", creator=BOT, created_ts=3)
    orphan = RoomState("!orphan", creator=BOT, created_ts=3)
    theirs = RoomState("!theirs", creator=BOB, created_ts=3)  # not made by the bot
    rooms = by_id(managed, listed, orphan, theirs)
    spaces = {ANN: managed}
    chats, skipped = find_chats(rooms, BOT, spaces, child_owners(spaces))
    assert [r.room_id for r in chats[ANN]] == ["!listed"]
    assert skipped == 2  # the orphan and the foreign room; the Space is not counted


def test_find_chats_prefers_the_space_a_room_names_as_parent() -> None:
    first = space("!s1", ANN, children=("!r",))
    second = space("!s2", BOB, children=("!r",))
    claimed = RoomState("!r", creator=BOT, parents={"!s2": True})
    spaces = {ANN: first, BOB: second}
    chats, _ = find_chats(by_id(first, second, claimed), BOT, spaces, child_owners(spaces))
    assert list(chats) == [BOB]


# number_chats


def test_number_chats_keeps_marked_numbers_and_renumbers_the_rest() -> None:
    first, clash, bare = chat("!a", ts=1), chat("!b", pcid="p2", ts=2), RoomState("!c", BOT, 3)
    spaces = {ANN: space("!s", ANN)}
    numbered = number_chats({ANN: [first, clash, bare]}, spaces, {}, {}, "echo", 7)[ANN]
    got = {room.room_id: (r.chat_id, r.platform_chat_id, write) for room, r, write in numbered.rows}
    assert got == {
        "!a": ("C1", "p1", False),
        "!b": ("C2", "p2", True),  # C1 was taken: renumbered, its marker rewritten
        "!c": ("C3", adopted_platform_chat_id("!c"), True),
    }
    assert numbered.next_index == 4 and numbered.conflicts == 1


def test_number_chats_goes_past_every_number_the_database_has_seen() -> None:
    bare = RoomState("!new", BOT, 3)
    known_rooms = {"!left": row("!left", chat_id="C6", gone=True)}
    known_users = {ANN: UserRow(ANN, "!s", 9, 1)}
    spaces = {ANN: space("!s", ANN)}
    numbered = number_chats({ANN: [bare]}, spaces, known_users, known_rooms, "echo", 7)
    assert numbered[ANN].rows[0][1].chat_id == "C9" and numbered[ANN].next_index == 10


def test_number_chats_gives_a_platform_chat_id_seen_before_a_fresh_one() -> None:
    ann, bob = chat("!a", ts=1), chat("!b", BOB, ts=2)  # both say p1
    numbered = number_chats({ANN: [ann], BOB: [bob]}, {}, {}, {}, "echo", 7)
    assert numbered[ANN].rows[0][1].platform_chat_id == "p1"
    _, bob_row, rewrite = numbered[BOB].rows[0]
    assert bob_row.platform_chat_id == adopted_platform_chat_id("!b") and rewrite
    assert numbered[BOB].conflicts == 1


def test_number_chats_rewrites_markers_naming_another_space() -> None:
    moved = chat("!a", space_id="!elsewhere")
    numbered = number_chats({ANN: [moved]}, {ANN: space("!s", ANN)}, {}, {}, "echo", 7)
    assert numbered[ANN].rows[0][2] is True


def test_number_chats_includes_owners_with_only_a_space() -> None:
    numbered = number_chats({}, {ANN: space("!s", ANN)}, {}, {}, "echo", 7)
    assert numbered[ANN].rows == [] and numbered[ANN].next_index == 1


def test_number_chats_names_rooms_from_matrix_then_the_database() -> None:
    named = chat("!a", name="Matrix name")
    unnamed = chat("!b", chat_id="C2", pcid="p2")
    known = {"!b": row("!b", chat_id="C2", name="Stored name")}
    rows = number_chats({ANN: [named, unnamed]}, {}, {}, known, "echo", 7)[ANN].rows
    assert [r.name for _, r, _ in rows] == ["Matrix name", "Stored name"]


# user_row


def test_user_row_only_when_missing_or_different() -> None:
    known = UserRow(ANN, "!s", 3, 1)
    assert user_row(ANN, "!s", 3, known, 7) is None
    assert user_row(ANN, "!s", 4, known, 7) == UserRow(ANN, "!s", 4, 7)
    assert user_row(ANN, None, 3, known, 7) is None  # a Space not found is not forgotten
    assert user_row(ANN, "!s", 1, None, 7) == UserRow(ANN, "!s", 1, 7)


# diff_rows


def test_diff_rows_splits_missing_from_differing_and_keeps_created_at() -> None:
    same, renamed, new = row("!same"), row("!renamed", name="New"), row("!new")
    known = {"!same": replace(same, created_at=1), "!renamed": replace(renamed, name="Old")}
    missing, differing = diff_rows([same, renamed, new], known)
    assert missing == {"!new": new}
    assert differing == {"!renamed": replace(renamed, created_at=known["!renamed"].created_at)}


# link_writes


def test_link_writes_lists_active_rooms_and_unlists_archived_ones() -> None:
    managed = space("!s", ANN, children=("!archived",))
    active = RoomState("!active")
    archived = RoomState("!archived", parents={"!s": True})
    writes = link_writes(managed, active, row("!active", chat_id="C3"), "hs")
    assert writes == [
        ("!s", "m.space.child", "!active", {"via": ["hs"], "order": "00000003"}),
        ("!active", "m.space.parent", "!s", {"via": ["hs"], "canonical": True}),
    ]
    assert link_writes(managed, archived, row("!archived", archived=True), "hs") == [
        ("!s", "m.space.child", "!archived", {})
    ]


def test_link_writes_nothing_for_consistent_links() -> None:
    managed = space("!s", ANN, children=("!a",))
    linked = RoomState("!a", parents={"!s": True})
    assert link_writes(managed, linked, row("!a"), "hs") == []


# power_writes


def test_power_writes_only_for_managed_rooms_that_need_them() -> None:
    fix = {"redact": 100}
    spaces = {ANN: replace(space("!s", ANN), power_levels_fix=fix), BOB: space("!b", BOB)}
    fixed_chat = replace(chat("!c"), power_levels_fix=fix)
    numbered = number_chats({ANN: [fixed_chat, chat("!d", chat_id="C2")]}, spaces, {}, {}, "e", 7)
    assert power_writes(spaces, numbered) == [
        ("!s", "m.room.power_levels", "", fix),
        ("!c", "m.room.power_levels", "", fix),
    ]


# gone_rooms


def test_gone_rooms_marks_rooms_left_or_upgraded_once() -> None:
    known = {
        "!here": row("!here"),
        "!left": row("!left"),
        "!upgraded": row("!upgraded"),
        "!already": row("!already", gone=True),
    }
    rooms = by_id(RoomState("!here"), RoomState("!upgraded", tombstoned=True))
    gone = gone_rooms(rooms, known)
    assert set(gone) == {"!left", "!upgraded"} and all(r.gone for r in gone.values())


# Reconciler, on fakes of what it is given


class FakeMatrix:
    user_id, server_name, device_id = BOT, "hs", "DEVICE"

    def __init__(self, states: dict[str, list[dict]]) -> None:
        self.states = states
        self.requests = 0
        self.batches: list[tuple[list[str], str]] = []  # (room ids, connection) per batch
        self.batch_error: HomeserverError | None = None
        self.left_out: set[str] = set()  # rooms a batched answer leaves out
        self.state_error: HomeserverError | None = None
        self.crypto = SimpleNamespace(available=True)
        self.sent: list[tuple[str, str, str, dict]] = []

    async def joined_rooms(self) -> list[str]:
        self.requests += 1
        return list(self.states)

    async def state(self, room_id: str) -> list[dict]:
        self.requests += 1
        if self.state_error is not None:
            raise self.state_error
        return self.states[room_id]

    async def rooms_state(
        self, room_ids: list[str], types: list[str], conn_id: str
    ) -> dict[str, list[dict]]:
        self.requests += 1
        self.batches.append((room_ids, conn_id))
        await asyncio.sleep(0)  # batches overlap, as on a real homeserver
        if self.batch_error is not None:
            raise self.batch_error
        return {
            room_id: [e for e in self.states[room_id] if e["type"] in types]
            for room_id in room_ids
            if room_id not in self.left_out
        }

    async def send_state(self, room_id: str, event_type: str, content: dict, key: str) -> str:
        self.requests += 1
        self.sent.append((room_id, event_type, key, content))
        self.states[room_id].append(
            {"type": event_type, "state_key": key, "content": content, "sender": BOT}
        )
        return "$e"


class FakeStore:
    def __init__(self) -> None:
        self.users: dict[str, UserRow] = {}
        self.rooms: dict[str, ChatRoomRow] = {}

    async def upsert_users(self, users: list[UserRow]) -> None:
        self.users.update({u.user_id: u for u in users})

    async def upsert_rooms(self, rooms: list[ChatRoomRow]) -> None:
        self.rooms.update({r.room_id: r for r in rooms})


class FakeRegistry:
    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.users: dict[str, UserRow] = {}
        self.rooms: dict[str, ChatRoomRow] = {}

    async def load(self) -> None:
        self.users, self.rooms = dict(self.store.users), dict(self.store.rooms)


def event(etype: str, content: dict, key: str = "", sender: str = BOT, ts: int = 1) -> dict:
    return {
        "type": etype,
        "state_key": key,
        "content": content,
        "sender": sender,
        "origin_server_ts": ts,
    }


async def test_reconciler_runs_on_what_it_is_given() -> None:
    older_room = [  # made by an older version: no marker, listed in the Space
        event("m.room.create", {}, ts=2),
    ]
    the_space = [
        event("m.room.create", {"type": "m.space"}),
        event(MARKER_TYPE, Marker(KIND_SPACE, ANN).content()),
        event("m.space.child", {"via": ["hs"]}, "!old"),
    ]
    mx = FakeMatrix({"!s": the_space, "!old": older_room})
    store = FakeStore()
    registry = FakeRegistry(store)
    settings = SimpleNamespace(default_agent="first", read_batch=0)
    log = logging.getLogger("test.reconcile")
    reconciler = Reconciler(mx, store, registry, lambda: settings, log)  # type: ignore[arg-type]

    settings = SimpleNamespace(default_agent="gpt", read_batch=0)  # read at run time
    report = await reconciler.run()
    assert reconciler.last_report is report
    assert report.restored_chat_rows == 1 and report.requests == len(mx.sent) + 3
    assert registry.rooms["!old"].agent_id == "gpt" and registry.users[ANN].space_id == "!s"
    assert (await reconciler.run()).writes == 0

    fresh = FakeStore()
    dry_runner = Reconciler(mx, fresh, FakeRegistry(fresh), lambda: settings, log)  # type: ignore[arg-type]
    dry = await dry_runner.run(dry_run=True)
    assert dry.dry_run and dry.restored_chat_rows == 1 and len(mx.sent) == 2


def many_rooms(n: int) -> dict[str, list[dict]]:
    """A Space of ``n`` chat rooms, each with its marker, and a room the bot did not make."""
    space = [
        event("m.room.create", {"type": "m.space"}),
        event(MARKER_TYPE, Marker(KIND_SPACE, ANN).content()),
        event("m.room.member", {"membership": "join"}, BOT),  # not read: left out of batches
    ]
    states = {"!space": space, "!theirs": [event("m.room.create", {}, sender=ANN)]}
    for i in range(n):
        room = f"!c{i}"
        marker = Marker(KIND_CHAT, ANN, "!space", str(i + 1), "echo", f"p{i}")
        states[room] = [
            event("m.room.create", {}),
            event(MARKER_TYPE, marker.content()),
            event("m.space.parent", {"via": ["hs"]}, "!space"),
        ]
        space.append(event("m.space.child", {"via": ["hs"]}, room))
    return states


def reconciler_for(mx: FakeMatrix, read_batch: int) -> Reconciler:
    store = FakeStore()
    settings = SimpleNamespace(default_agent="echo", read_batch=read_batch)
    log = logging.getLogger("test.reconcile")
    return Reconciler(mx, store, FakeRegistry(store), lambda: settings, log)  # type: ignore[arg-type]


async def test_batched_reads_find_what_reads_room_by_room_find() -> None:
    one_by_one = await reconciler_for(FakeMatrix(many_rooms(25)), read_batch=0).read_topology()
    mx = FakeMatrix(many_rooms(25))
    batched = await reconciler_for(mx, read_batch=10).read_topology()
    assert batched == one_by_one and len(batched) == 27
    assert [len(ids) for ids, _ in mx.batches] == [10, 10, 7]
    assert len({conn for _, conn in mx.batches}) == 3  # a connection each, reused next start
    assert mx.requests == 1 + 3  # /joined_rooms and the batches: no /state


async def test_rooms_a_batch_leaves_out_are_read_room_by_room() -> None:
    mx = FakeMatrix(many_rooms(5))
    mx.left_out = {"!c3", "!space"}
    reconciler = reconciler_for(mx, read_batch=100)
    states = await reconciler.read_topology()
    assert states["!c3"].marker is not None and len(states["!space"].children) == 5
    assert mx.requests == 1 + 1 + 2  # joined, one batch, two /state


async def test_a_homeserver_without_sliding_sync_is_read_room_by_room_and_not_asked_again() -> None:
    mx = FakeMatrix(many_rooms(30))
    mx.batch_error = HomeserverError(404, "M_UNRECOGNIZED", "Unrecognized request")
    reconciler = reconciler_for(mx, read_batch=10)
    report = await reconciler.run()
    assert report.restored_chat_rows == 30 and not reconciler.sliding_sync
    asked = len(mx.batches)
    assert 1 <= asked <= BATCHES_AT_ONCE  # batches already under way ask once each
    await reconciler.run()
    assert len(mx.batches) == asked


@pytest.mark.parametrize(
    "error",
    [
        HomeserverError(500, "M_UNKNOWN", "Internal server error"),  # a device-less token
        HomeserverError(0, None, "connection failed: TimeoutError"),  # a batch too slow
        HomeserverError(400, "M_BAD_JSON", "bad body"),
    ],
)
async def test_a_failed_batch_is_read_room_by_room_and_no_more_batches_are_asked(
    error: HomeserverError,
) -> None:
    mx = FakeMatrix(many_rooms(28))
    mx.batch_error = error
    reconciler = reconciler_for(mx, read_batch=10)
    assert (await reconciler.run()).restored_chat_rows == 28
    assert not reconciler.sliding_sync and len(mx.batches) <= 3
    asked = len(mx.batches)
    mx.batch_error = None
    await reconciler.run()
    assert len(mx.batches) == asked  # this instance reads room by room from now on


async def test_an_unreachable_homeserver_fails_the_whole_read() -> None:
    mx = FakeMatrix(many_rooms(3))
    mx.batch_error = mx.state_error = HomeserverError(0, None, "connection failed: refused")
    with pytest.raises(HomeserverError) as raised:
        await reconciler_for(mx, read_batch=10).read_topology()
    assert raised.value.status == 0 and len(mx.batches) == 1


async def test_a_client_without_a_device_reads_room_by_room() -> None:
    mx = FakeMatrix(many_rooms(3))
    mx.device_id = None  # type: ignore[assignment]
    states = await reconciler_for(mx, read_batch=10).read_topology()
    assert len(states) == 5 and mx.batches == []


async def test_nothing_is_written_into_or_naming_a_room_changed_during_the_run() -> None:
    """A chat archived (a command) while a verification read the rooms: its row, its state
    and its Space's child link are left as the command made them; other rooms are written."""
    mx = FakeMatrix({"!space": [], "!x": [], "!y": []})
    reconciler = reconciler_for(mx, read_batch=0)
    before = ChatRoomRow("!x", "@u:hs", "C1", "Chat 1", "echo", "p1", False, False, 0)
    other = replace(before, room_id="!y", chat_id="C2", platform_chat_id="p2")
    reconciler.registry.rooms = {"!x": replace(before, archived=True), "!y": other}
    link = {"via": ["hs"]}
    result = Plan(rooms={"!y": other}, state_writes=[  # !x's read row matched: not rewritten
        ("!space", "m.space.child", "!x", link), ("!x", "m.room.power_levels", "", {}),
        ("!space", "m.space.child", "!y", link),
    ])  # fmt: skip
    await reconciler._apply(result, {"!x": before, "!y": other})
    assert [(room, kind, key) for room, kind, key, _ in mx.sent] == [("!space", "m.space.child", "!y")]
