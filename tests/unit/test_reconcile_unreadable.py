"""Unreadable is not gone: a room whose state read failed at start keeps its row and its
routing, is listed in the report (``unreadable_rooms``), and is read again in the background
until it succeeds; then its row is made right through ``Chats`` (the one writer of a chat)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from lambda_plugin.chats import Chats
from lambda_plugin.db import ChatRoomRow, Store, UserRow
from lambda_plugin.marker import KIND_CHAT, KIND_SPACE, MARKER_TYPE, Marker
from lambda_plugin.matrix import HomeserverError
from lambda_plugin.policy import Admission, admit
from lambda_plugin.reconcile import Reconciler, Rereads, Settled, backoff_s, plan, settle_room
from lambda_plugin.registry import Registry
from lambda_plugin.roomstate import RoomState, parse_room
from tests.unit.test_config import settings as make_settings
from tests.unit.test_reconcile_phases import FakeMatrix, event

BOT = "@bot:hs"
ANN = "@ann:hs"
LOG = logging.getLogger("test.reconcile.unreadable")
TIMEOUT = 10.0

ERRORS = {
    "500": HomeserverError(500, "M_UNKNOWN", "Internal server error"),
    "502 after its tries": HomeserverError(502, None, "Bad gateway"),
    "429 after its tries": HomeserverError(429, "M_LIMIT_EXCEEDED", "Too many requests"),
    "403 while joined": HomeserverError(403, "M_FORBIDDEN", "not allowed now"),
}


def chat_state(
    chat_id: str, pcid: str, name: str | None = None, agent: str = "echo", archived: bool = False
) -> list[dict]:
    content = Marker(KIND_CHAT, ANN, "!s", chat_id, agent, pcid, archived).content()
    events = [
        event("m.room.create", {}, ts=2),
        event(MARKER_TYPE, content),
        event("m.space.parent", {"via": ["hs"]}, "!s"),
    ]
    if name is not None:
        events.append(event("m.room.name", {"name": name}, sender=ANN))
    return events


def topology() -> dict[str, list[dict]]:
    """Ann's Space and her two chats, as the plugin made them."""
    return {
        "!s": [
            event("m.room.create", {"type": "m.space"}),
            event(MARKER_TYPE, Marker(KIND_SPACE, ANN).content()),
            event("m.space.child", {"via": ["hs"]}, "!c1"),
            event("m.space.child", {"via": ["hs"]}, "!c2"),
        ],
        "!c1": chat_state("C1", "p1", "First"),
        "!c2": chat_state("C2", "p2", "Second"),
    }


class FlakyRooms(FakeMatrix):
    """FakeMatrix whose /state fails for chosen rooms, and whose batches leave them out."""

    def __init__(self, states: dict[str, list[dict]]) -> None:
        super().__init__(states)
        self.failing: dict[str, HomeserverError] = {}
        self.not_joined: set[str] = set()
        self.left: set[str] = set()  # not joined, but the membership read shows "leave"
        self.joined_asked = 0

    async def joined_rooms(self) -> list[str]:
        self.requests += 1
        self.joined_asked += 1
        return [r for r in self.states if r not in self.not_joined | self.left]

    async def state(self, room_id: str) -> list[dict]:
        self.requests += 1
        await asyncio.sleep(0)
        if room_id in self.failing:
            raise self.failing[room_id]
        if room_id in self.not_joined:
            raise HomeserverError(403, "M_FORBIDDEN", "You are not in the room")
        return self.states[room_id]

    async def state_event(self, room_id: str, event_type: str, key: str = "") -> dict | None:
        self.requests += 1
        assert (event_type, key) == ("m.room.member", BOT)  # the bot's own membership only
        if room_id in self.left:
            return {"membership": "leave"}  # a room left shows its state as it was
        if room_id in self.not_joined:
            raise HomeserverError(403, "M_FORBIDDEN", "You are not in the room")
        return {"membership": "join"} if room_id in self.states else None

    async def send_state(self, room_id: str, event_type: str, content: dict, key: str = "") -> str:
        return await super().send_state(room_id, event_type, content, key)  # as Chats calls it

    async def rooms_state(self, room_ids: list[str], types: list[str], conn_id: str) -> dict:
        self.left_out = set(self.failing)  # a failing room's batch read fails for it
        return await super().rooms_state(room_ids, types, conn_id)


async def seeded(store: Store) -> Registry:
    """The database as the last start left it: Ann, her Space and her two chats."""
    await store.upsert_users([UserRow(ANN, "!s", 3, 1)])
    await store.upsert_rooms(
        [
            ChatRoomRow("!c1", ANN, "C1", "First", "echo", "p1", False, False, 2),
            ChatRoomRow("!c2", ANN, "C2", "Second", "echo", "p2", False, False, 2),
        ]
    )
    registry = Registry(store)
    await registry.load()
    return registry


def reconciler_of(mx: FakeMatrix, store: Store, registry: Registry, read_batch: int) -> Reconciler:
    settings = SimpleNamespace(default_agent="echo", read_batch=read_batch)
    reconciler = Reconciler(mx, store, registry, lambda: settings, LOG)  # type: ignore[arg-type]
    reconciler.chats = Chats(registry, mx, LOG)  # type: ignore[arg-type]
    return reconciler


@pytest.mark.parametrize("read_batch", [0, 10], ids=["room by room", "batched"])
@pytest.mark.parametrize("error", list(ERRORS.values()), ids=list(ERRORS))
async def test_a_room_whose_read_failed_keeps_its_row_and_routing(
    store: Store, error: HomeserverError, read_batch: int
) -> None:
    mx = FlakyRooms(topology())
    mx.failing["!c1"] = error
    registry = await seeded(store)
    before = dict(registry.rooms)
    report = await reconciler_of(mx, store, registry, read_batch).run()
    assert registry.rooms == before and not (await store.get_room("!c1")).gone  # type: ignore[union-attr]
    assert admit(registry.room("!c1"), ANN, make_settings()) is Admission.TAKE
    assert report.unreadable_rooms == ["!c1"]
    assert report.gone_rooms == 0 and report.skipped_rooms == 0 and report.joined_rooms == 3
    assert "unreadable_rooms=!c1 " in report.line() + " "


async def test_a_room_the_bot_left_is_still_gone(store: Store) -> None:
    mx = FlakyRooms(topology())
    mx.not_joined.add("!c2")  # not in /joined_rooms: it was left, not unreadable
    registry = await seeded(store)
    report = await reconciler_of(mx, store, registry, read_batch=0).run()
    assert registry.rooms["!c2"].gone and report.gone_rooms == 1
    assert report.unreadable_rooms == []


# plan(): pure, on what was read, the rooms whose read failed, and the database's rows


def known_rows() -> dict[str, ChatRoomRow]:
    return {
        "!c1": ChatRoomRow("!c1", ANN, "C1", "First", "echo", "p1", False, False, 2),
        "!c2": ChatRoomRow("!c2", ANN, "C2", "Second", "echo", "p2", False, False, 2),
    }


@pytest.mark.parametrize(
    "unread",
    [{"!c1"}, {"!s"}, {"!s", "!c1", "!c2"}, {"!c1", "!new"}],
    ids=["a chat", "the Space", "everything", "a room the database lost"],
)
def test_plan_leaves_the_rows_of_rooms_it_could_not_read(unread: set[str]) -> None:
    states = {k: v for k, v in topology().items() if k not in unread}
    users = {ANN: UserRow(ANN, "!s", 3, 1)}
    result = plan(states, BOT, "hs", users, known_rows(), "echo", unread=unread)
    assert not set(result.rooms) & unread  # no row of theirs is written, none marked gone
    assert result.report.gone_rooms == 0 and result.users == {}
    assert result.report.unreadable_rooms == sorted(unread)
    assert result.report.joined_rooms == 3 + ("!new" in unread)
    assert not [w for w in result.state_writes if w[0] in unread]  # nothing written into them
    assert result.report.writes == 0


def test_plan_still_marks_gone_what_the_bot_left() -> None:
    states = {k: v for k, v in topology().items() if k != "!c2"}
    result = plan(states, BOT, "hs", {ANN: UserRow(ANN, "!s", 3, 1)}, known_rows(), "echo")
    assert result.rooms["!c2"].gone and result.report.unreadable_rooms == []


def test_plan_reports_unreadable_rooms_in_one_bounded_log_line() -> None:
    unread = {f"!r{i:03}:hs" for i in range(500)} | {"!evil\nline:hs"}
    report = plan({}, BOT, "hs", {}, {}, "echo", unread=unread).report
    line = report.line()
    assert "\n" not in line and len(line) < 2000
    assert "unreadable_rooms=!evil?line:hs,!r000:hs," in line and "(+491)" in line
    assert len(report.unreadable_rooms) == 501  # the report keeps them all
    assert plan({}, BOT, "hs", {}, {}, "echo").report.as_dict()["unreadable_rooms"] == "none"


# settle_room(): pure, what one room read again means for its row


def parsed(room_id: str, events: list[dict]) -> RoomState:
    return parse_room(room_id, events, BOT)


C1 = known_rows()["!c1"]
SETTLE_CASES = {
    # name: (the room as read again, or None: not joined; its row; expected Settled)
    "left: gone": (None, C1, Settled(row=replace(C1, gone=True))),
    "left, no row: nothing": (None, None, Settled()),
    "left, already gone": (None, replace(C1, gone=True), Settled()),
    "upgraded: gone": (
        [*chat_state("C1", "p1", "First"), event("m.room.tombstone", {"replacement_room": "!n"})],
        C1, Settled(row=replace(C1, gone=True)),
    ),
    "as it was: nothing": (chat_state("C1", "p1", "First"), C1, Settled()),
    "renamed meanwhile": (chat_state("C1", "p1", "Plans"), C1, Settled(row=replace(C1, name="Plans"))),
    "agent and archive changed": (
        chat_state("C1", "p1", "First", agent="gpt", archived=True),
        C1, Settled(row=replace(C1, agent_id="gpt", archived=True)),
    ),
    "the database lost it": (chat_state("C1", "p1", "First"), None, Settled(row=C1)),
    "back after a gone mark": (chat_state("C1", "p1", "First"), replace(C1, gone=True), Settled(row=C1)),
    "its number is another room's": (chat_state("C2", "p1", "First"), C1, Settled(conflict=True)),
    "its id is another room's": (chat_state("C1", "p2", "First"), C1, Settled(conflict=True)),
    "a bad number": (chat_state("seven", "p1", "First"), C1, Settled(conflict=True)),
    "a forged marker": (
        [event("m.room.create", {}, sender=ANN), event(MARKER_TYPE, Marker.for_chat(C1, "!s").content())],
        C1, Settled(),
    ),
    "an emptied marker taken back": (
        [event("m.room.create", {}, ts=2), event(MARKER_TYPE, {}), event("m.room.name", {"name": "First"})],
        C1, Settled(),
    ),
}  # fmt: skip


@pytest.mark.parametrize(("events", "known", "expected"), SETTLE_CASES.values(), ids=SETTLE_CASES)
def test_settle_room(
    events: list[dict] | None, known: ChatRoomRow | None, expected: Settled
) -> None:
    rows = {**known_rows(), "!c1": known} if known else {"!c2": known_rows()["!c2"]}
    room = parsed("!c1", events) if events is not None else None
    users = {ANN: UserRow(ANN, "!s", 3, 1)}
    assert settle_room(room, "!c1", BOT, users, rows, "echo", now=99) == expected


@pytest.mark.parametrize(
    ("users", "expected"),
    [({}, Settled(space_owner=ANN)), ({ANN: UserRow(ANN, None, 3, 1)}, Settled(space_owner=ANN)),
     ({ANN: UserRow(ANN, "!s", 3, 1)}, Settled()), ({ANN: UserRow(ANN, "!other", 3, 1)}, Settled())],
    ids=["no user row", "no Space yet", "known", "another Space"],
)  # fmt: skip
def test_settle_room_gives_a_space_back_to_an_owner_without_one(
    users: dict[str, UserRow], expected: Settled
) -> None:
    room = parsed("!s", topology()["!s"])
    assert settle_room(room, "!s", BOT, users, {}, "echo", now=99) == expected


# Rereads: the retry loop, on a fake read


class Reads:
    """A fake ``read``: fails each room ``failures[room]`` times (None: always), then succeeds."""

    def __init__(self, failures: dict[str, int | None], error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or HomeserverError(500, "M_UNKNOWN", "still broken")
        self.calls: list[str] = []
        self.done: list[str] = []
        self.gate: asyncio.Event | None = None  # set: reads wait for it
        self.in_flight = self.most_at_once = 0

    async def __call__(self, room_id: str) -> None:
        self.calls.append(room_id)
        self.in_flight += 1
        self.most_at_once = max(self.most_at_once, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            left = self.failures.get(room_id, 0)
            if left is None or left > 0:
                self.failures[room_id] = None if left is None else left - 1
                raise self.error
            self.done.append(room_id)
        finally:
            self.in_flight -= 1


async def until(check, what: str) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"not reached: {what}") from None


@pytest.fixture
async def looping():
    """Starts Rereads.run() on a fake read, with short waits; cancels it afterwards."""
    tasks: list[asyncio.Task] = []

    def start(reads: Reads, **kw: Any) -> Rereads:
        options = {"first_s": 0.005, "max_s": 0.02, "max_tries": 5, "at_once": 2, **kw}
        rereads = Rereads(reads, LOG, **options)
        tasks.append(asyncio.create_task(rereads.run()))
        return rereads

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize(
    "error", [HomeserverError(502, None, "Bad gateway"), RuntimeError("database down")]
)
async def test_rereads_try_again_until_a_read_succeeds(looping, error: Exception) -> None:
    reads = Reads({"!a": 2, "!b": 0}, error)
    rereads = looping(reads)
    rereads.replace(["!a", "!b"])
    assert rereads.pending() == ["!a", "!b"]
    await until(lambda: rereads.pending() == [], "every room read")
    assert sorted(reads.done) == ["!a", "!b"] and reads.calls.count("!a") == 3
    assert reads.calls.count("!b") == 1 and rereads.given_up() == []


async def test_rereads_give_up_after_their_tries(looping, caplog) -> None:
    reads = Reads({"!a": None})
    rereads = looping(reads, max_tries=4)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        rereads.replace(["!a"])
        await until(lambda: rereads.given_up() == ["!a"], "given up")
    assert reads.calls == ["!a"] * 4 and rereads.pending() == []
    assert any("!a" in r.getMessage() and "4 tries" in r.getMessage() for r in caplog.records)
    rereads.replace(["!a"])  # a later reconciliation could not read it either: tried anew
    await until(lambda: len(reads.calls) == 8, "tried anew")


async def test_rereads_read_a_bounded_number_of_rooms_at_once(looping) -> None:
    reads = Reads({})
    reads.gate = asyncio.Event()
    rereads = looping(reads, at_once=3)
    rereads.replace([f"!r{i}" for i in range(20)])
    await until(lambda: reads.in_flight == 3, "three reads under way")
    reads.gate.set()
    await until(lambda: len(reads.done) == 20, "all read")
    assert reads.most_at_once == 3


async def test_a_new_reconciliation_replaces_what_is_to_be_read(looping) -> None:
    reads = Reads({"!a": None, "!b": None})
    rereads = looping(reads, first_s=0.01, max_s=0.01, max_tries=1000)
    rereads.replace(["!a", "!b"])
    await until(lambda: {"!a", "!b"} <= set(reads.calls), "both tried")
    rereads.replace(["!b"])  # !a was read by the new run
    assert rereads.pending() == ["!b"]
    seen = len(reads.calls)
    await until(lambda: reads.calls[seen:].count("!b") >= 2, "!b tried on")
    assert "!a" not in reads.calls[seen + 1 :]  # (one try of !a may have been under way)


async def test_stopping_ends_the_loop_and_later_rooms_are_not_read(looping) -> None:
    reads = Reads({})
    reads.gate = asyncio.Event()
    rereads = Rereads(reads, LOG, first_s=0.001)
    task = asyncio.create_task(rereads.run())
    rereads.replace(["!a"])
    await until(lambda: reads.in_flight == 1, "a read under way")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and reads.done == []
    rereads.replace(["!b"])  # after the stop: kept, never read, no error
    assert reads.calls == ["!a"]


@pytest.mark.parametrize(
    ("tries", "expected"), [(1, 10.0), (2, 20.0), (3, 40.0), (8, 900.0), (10**6, 900.0)]
)
def test_backoff_doubles_up_to_its_bound(tries: int, expected: float) -> None:
    assert backoff_s(tries, 10.0, 900.0) == expected


# The Reconciler's re-read: one room read again, its row made right through Chats


async def started_with_c1_unreadable(store: Store) -> tuple[FlakyRooms, Registry, Reconciler]:
    mx = FlakyRooms(topology())
    mx.failing["!c1"] = ERRORS["500"]
    registry = await seeded(store)
    reconciler = reconciler_of(mx, store, registry, read_batch=10)
    reconciler.rereads.first_s = reconciler.rereads.max_s = 0.005  # when its loop runs
    assert (await reconciler.run()).unreadable_rooms == ["!c1"]
    assert reconciler.rereads.pending() == ["!c1"]
    return mx, registry, reconciler


async def test_an_unreadable_room_is_read_again_and_its_row_made_right(store: Store) -> None:
    mx, registry, reconciler = await started_with_c1_unreadable(store)
    with pytest.raises(HomeserverError):
        await reconciler.reread("!c1")  # still failing: raised, for the loop to try later
    assert reconciler.last_report.unreadable_rooms == ["!c1"]  # type: ignore[union-attr]
    del mx.failing["!c1"]
    mx.states["!c1"] = chat_state("C1", "p1", "Renamed while unreadable")
    await reconciler.reread("!c1")
    assert registry.rooms["!c1"].name == "Renamed while unreadable"
    assert (await store.get_room("!c1")).name == "Renamed while unreadable"  # type: ignore[union-attr]
    assert reconciler.last_report.unreadable_rooms == []  # type: ignore[union-attr]
    assert "unreadable_rooms=none" in reconciler.last_report.line()  # type: ignore[union-attr]


@pytest.mark.parametrize("how", ["left", "not_joined"], ids=["membership leave", "403"])
async def test_a_room_left_while_unreadable_is_marked_gone_when_read_again(
    store: Store, how: str
) -> None:
    mx, registry, reconciler = await started_with_c1_unreadable(store)
    del mx.failing["!c1"]
    getattr(mx, how).add("!c1")
    await reconciler.reread("!c1")
    assert registry.rooms["!c1"].gone and (await store.get_room("!c1")).gone  # type: ignore[union-attr]


async def test_reading_again_asks_no_room_list_while_the_bot_is_in_the_room(store: Store) -> None:
    mx, _, reconciler = await started_with_c1_unreadable(store)
    asked = mx.joined_asked
    with pytest.raises(HomeserverError):
        await reconciler.reread("!c1")
    del mx.failing["!c1"]
    await reconciler.reread("!c1")
    assert mx.joined_asked == asked  # its own membership said so: one small read each


async def test_a_row_changed_while_the_room_was_read_again_is_left_alone(store: Store) -> None:
    mx, registry, reconciler = await started_with_c1_unreadable(store)
    del mx.failing["!c1"]
    mx.states["!c1"] = chat_state("C1", "p1", "Stale name")
    chats = reconciler.chats
    assert chats is not None
    read = mx.state

    async def read_then_a_command_runs(room_id: str) -> list[dict]:
        events = await read(room_id)
        await chats.update(room_id, agent_id="gpt")  # !agent gpt, while the read was under way
        return events

    mx.state = read_then_a_command_runs  # type: ignore[method-assign]
    await reconciler.reread("!c1")
    assert registry.rooms["!c1"].agent_id == "gpt" and registry.rooms["!c1"].name == "First"


async def test_a_lost_row_and_space_come_back_when_read_again(store: Store) -> None:
    mx = FlakyRooms(topology())
    mx.failing.update({"!s": ERRORS["500"], "!c1": ERRORS["500"]})
    registry = Registry(store)  # the database was lost
    reconciler = reconciler_of(mx, store, registry, read_batch=0)
    report = await reconciler.run()
    assert report.unreadable_rooms == ["!c1", "!s"] and registry.room("!c1") is None
    assert registry.users[ANN].space_id is None  # !c2 was read: Ann is known, her Space not
    mx.failing.clear()
    for room_id in ("!s", "!c1"):
        await reconciler.reread(room_id)
    assert registry.rooms["!c1"] == known_rows()["!c1"]
    assert registry.users[ANN].space_id == "!s" and registry.spaces == {"!s": ANN}
    assert (await store.get_user(ANN)).next_chat_index == 3  # type: ignore[union-attr]
    assert reconciler.last_report.unreadable_rooms == []  # type: ignore[union-attr]


async def test_the_background_loop_settles_what_a_start_could_not_read(store: Store) -> None:
    mx, registry, reconciler = await started_with_c1_unreadable(store)
    task = asyncio.create_task(reconciler.rereads.run())
    try:
        await until(lambda: mx.requests > 8, "a few failed re-reads")
        assert reconciler.last_report.unreadable_rooms == ["!c1"]  # type: ignore[union-attr]
        del mx.failing["!c1"]
        await until(lambda: reconciler.last_report.unreadable_rooms == [], "read at last")  # type: ignore[union-attr]
        assert reconciler.rereads.pending() == [] and not registry.rooms["!c1"].gone
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


TIMED_OUT = HomeserverError(0, None, "connection failed: TimeoutError")


@pytest.mark.parametrize("read_batch", [0, 10])
async def test_one_room_timing_out_is_unreadable_not_a_failed_run(store, read_batch) -> None:
    """A time-out (status 0) of one room's read, the homeserver answering the rest: that
    room is unreadable, the run goes on (it used to fail whole, and a start never ended)."""
    mx = FlakyRooms(topology())
    mx.failing["!c1"] = TIMED_OUT
    registry = await seeded(store)
    report = await reconciler_of(mx, store, registry, read_batch).run()
    assert "!c1" in report.unreadable_rooms
