"""Catch-up: what a start runs (``plan_start``: a notice naming an event answers it, even with
a lost database; the ledger's ends and unfinished events), hostile timelines and /sync
answers, and CatchUp.queue putting missed messages and commands at the head of their rooms'
queues as one sequence in timeline order.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from lambda_plugin.catchup import CatchUp, StartPlan, parse_invites, plan_start, timelines_of
from lambda_plugin.gate import StartGate
from lambda_plugin.intake import ANSWERS, Incoming, Kind
from lambda_plugin.queue import RoomQueues
from tests.unit.test_queue import TIMEOUT, FakeStage, settle

BOT = "@lambda:example.org"
USER = "@alice:example.org"
ROOM = "!a:example.org"
OTHER_ROOM = "!b:example.org"
ARCHIVED_ROOM = "!archived:example.org"
LOG = logging.getLogger("test.catchup")
SINCE = 1_000  # every well-formed event below is newer
KNOWN = frozenset({"$known-a", "$known-b"})  # the database knows an event of each room


def message(event_id: str, body: str | None = None, ts: int = 5_000, **extra: Any) -> dict:
    event = {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": USER,
        "origin_server_ts": ts,
        "content": {"msgtype": "m.text", "body": body if body is not None else event_id},
    }
    event.update(extra)
    return event


def notice(event_id: str, answers: Any = None, ts: int = 5_000) -> dict:
    content: dict[str, Any] = {"msgtype": "m.notice", "body": "answer", "m.mentions": {}}
    if answers is not None:
        content[ANSWERS] = answers
    return {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": BOT,
        "origin_server_ts": ts,
        "content": content,
    }


def unanswered(
    timelines: dict[str, list[Any]], rooms: set[str], bot: str, since: int, handled: set[str]
) -> list[tuple[str, str]]:
    """(room, event id) a start runs in ``rooms`` when the ledger ended ``handled``."""
    states = dict.fromkeys(handled, "answered")
    plan = plan_start({r: t for r, t in timelines.items() if r in rooms}, [], states, bot, since)
    return [(room_id, i.event_id) for room_id in sorted(plan.rooms) for i in plan.rooms[room_id]]


def ids(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return found


# --- unanswered: a notice naming an event answers it ------------------------------------------


def test_a_notice_naming_a_message_answers_it_though_the_database_lost_it() -> None:
    # The database was lost, then two restarts: the handled set knows a later event of the
    # room but not the older ones; the older answered one is named by the bot's notice.
    timeline = [
        message("$old-answered", ts=2_000),
        message("$old-unanswered", ts=3_000),
        notice("$n1", answers="$old-answered", ts=4_000),
        message("$later", ts=6_000),
    ]
    found = unanswered({ROOM: timeline}, {ROOM}, BOT, SINCE, handled={"$later"})
    assert ids(found) == [(ROOM, "$old-unanswered")]


def test_a_notice_answers_also_when_the_database_knows_nothing_of_the_room() -> None:
    timeline = [
        message("$m1", ts=2_000),
        message("$m2", ts=3_000),
        notice("$n1", answers="$m1", ts=4_000),
        message("$m3", ts=6_000),
    ]
    found = unanswered({ROOM: timeline}, {ROOM}, BOT, SINCE, handled=set())
    assert ids(found) == [(ROOM, "$m2"), (ROOM, "$m3")]


def test_a_bot_event_naming_nothing_answers_nothing() -> None:
    # The ledger and the answers' names decide, not where the bot last spoke: a stream's
    # partial (or a transcript) after a message does not make it answered.
    timeline = [message("$m1"), notice("$n1"), message("$m2")]
    found = unanswered({ROOM: timeline}, {ROOM}, BOT, SINCE, handled=set())
    assert ids(found) == [(ROOM, "$m1"), (ROOM, "$m2")]


def test_handled_and_named_messages_are_both_left_out_commands_kept() -> None:
    timeline = [
        message("$handled"),
        message("$named"),
        message("$cmd", body="!clear"),
        notice("$n1", answers="$named"),
        message("$new"),
    ]
    found = unanswered({ROOM: timeline}, {ROOM}, BOT, SINCE, handled={"$handled"})
    assert ids(found) == [(ROOM, "$cmd"), (ROOM, "$new")]


def test_a_notice_of_someone_else_naming_a_message_answers_nothing() -> None:
    forged = notice("$forged", answers="$m1")
    forged["sender"] = "@mallory:example.org"
    timeline = [message("$m1"), forged, message("$m2")]
    found = unanswered({ROOM: timeline}, {ROOM}, BOT, SINCE, handled={"$m2"})
    assert ids(found) == [(ROOM, "$m1")]


def test_older_than_the_window_is_not_returned() -> None:
    timeline = [message("$old", ts=10), message("$new", ts=5_000)]
    found = unanswered({ROOM: timeline}, {ROOM}, BOT, SINCE, handled=set())
    assert ids(found) == [(ROOM, "$new")]


def test_only_the_given_rooms_in_sorted_order() -> None:
    timelines = {
        OTHER_ROOM: [message("$b1")],
        ROOM: [message("$a1"), message("$a2")],
        "!elsewhere:example.org": [message("$x1")],
    }
    found = unanswered(timelines, {OTHER_ROOM, ROOM, "!empty:x"}, BOT, SINCE, handled=set())
    assert ids(found) == [(ROOM, "$a1"), (ROOM, "$a2"), (OTHER_ROOM, "$b1")]


# --- unanswered: hostile timelines -----------------------------------------------------------


def hostile_events() -> list[Any]:
    """Malformed events of every kind a room (or a broken homeserver) can hold: each is
    ignored (a field of the wrong type is skipped, not guessed at)."""
    with_content = [
        {"msgtype": "m.text", "body": "relates null", "m.relates_to": None},
        {"msgtype": "m.text", "body": "relates list", "m.relates_to": ["m.replace"]},
        {"msgtype": "m.text", "body": "relates string", "m.relates_to": "m.replace"},
        {"msgtype": "m.text", "body": "!clear", "m.relates_to": None},
        {"msgtype": "m.text", "body": 42},
        {"msgtype": "m.text", "body": None},
        {"msgtype": ["m.text"], "body": "msgtype list"},
        {"msgtype": "m.notice", "body": "user notice"},
    ]
    events: list[Any] = [
        message(f"$bad-content-{i}", **{"content": content})
        for i, content in enumerate(with_content)
    ]
    events += [
        message("$ts-string", ts="5000"),  # type: ignore[arg-type]
        message("$ts-bool", ts=True),  # type: ignore[arg-type]
        message("$ts-null", ts=None),  # type: ignore[arg-type]
        message("$ts-float", ts=5_000.5),  # type: ignore[arg-type]
        message(["$id-list"]),  # type: ignore[arg-type]
        message({"id": "$id-dict"}),  # type: ignore[arg-type]
        message(None),  # type: ignore[arg-type]
        message("$content-null", content=None),
        message("$content-list", content=["body"]),
        message("$sender-list", sender=[USER]),
        message("$sender-null", sender=None),
        message("$type-null", type=None),
        message("$type-list", type=["m.room.message"]),
        notice("$bot-answers-list", answers=["$ok"]),  # unhashable: must not raise
        notice("$bot-answers-dict", answers={"id": "$ok"}),
        notice("$bot-answers-int", answers=7),
        {"type": "m.room.message", "event_id": "$bot-content-null", "sender": BOT, "content": None},
        {},
    ]
    return events


def test_hostile_events_through_sync_never_raise_and_never_hide_the_others() -> None:
    # As Startup reads them: timelines_of first, then unanswered.
    hostile = [*hostile_events(), "a string", None, 7, ["list"]]
    sync = {
        "rooms": {
            "join": {
                ROOM: {
                    "timeline": {
                        "events": [
                            message("$known-a"),
                            message("$first"),
                            *hostile,
                            message("$ok"),
                        ]
                    }
                },
                OTHER_ROOM: {
                    "timeline": {
                        "events": [
                            message("$known-b"),
                            *hostile,
                            message("$other-ok"),
                        ]
                    }
                },
            }
        }
    }
    timelines = timelines_of(sync)
    found = unanswered(timelines, set(timelines), BOT, SINCE, handled=KNOWN)
    assert ids(found) == [
        (ROOM, "$first"),
        (ROOM, "$ok"),
        (OTHER_ROOM, "$other-ok"),
    ]


def test_hostile_bot_events_hide_nothing() -> None:
    timeline = [message("$before"), *hostile_events(), message("$after")]
    found = unanswered({ROOM: timeline}, {ROOM}, BOT, SINCE, handled=set())
    assert ids(found) == [(ROOM, "$before"), (ROOM, "$after")]


def test_hostile_dict_events_given_straight_to_unanswered_never_raise() -> None:
    timelines = {
        ROOM: [message("$known-a"), message("$first"), *hostile_events(), message("$ok")],
        OTHER_ROOM: [
            message("$known-b"),
            *hostile_events(),
            message("$other-ok"),
        ],
    }
    for handled in (KNOWN, KNOWN | {"$first"}, KNOWN | {"$unknown"}):
        found = unanswered(timelines, {ROOM, OTHER_ROOM}, BOT, SINCE, handled=handled)
        expected = [
            (ROOM, "$first"),
            (ROOM, "$ok"),
            (OTHER_ROOM, "$other-ok"),
        ]
        assert ids(found) == [e for e in expected if e[1] not in handled]


def test_non_dict_events_given_straight_to_unanswered_never_raise() -> None:
    timelines: dict[str, list[Any]] = {
        ROOM: [message("$first"), "a string", None, message("$ok")],
        OTHER_ROOM: [message("$other-ok")],
    }
    found = unanswered(timelines, {ROOM, OTHER_ROOM}, BOT, SINCE, handled={"$unknown"})
    assert ids(found) == [(ROOM, "$first"), (ROOM, "$ok"), (OTHER_ROOM, "$other-ok")]


# --- timelines_of / parse_invites on malformed /sync answers ---------------------------------


@pytest.mark.parametrize(
    "sync",
    [
        None,
        "sync",
        [],
        7,
        {},
        {"rooms": None},
        {"rooms": []},
        {"rooms": "rooms"},
        {"rooms": {"join": None}},
        {"rooms": {"join": []}},
        {"rooms": {"join": [ROOM]}},
        {"rooms": {"join": "join"}},
        {"rooms": {"join": {ROOM: None}}},
        {"rooms": {"join": {ROOM: []}}},
        {"rooms": {"join": {ROOM: {"timeline": None}}}},
        {"rooms": {"join": {ROOM: {"timeline": []}}}},
        {"rooms": {"join": {ROOM: {"timeline": {"events": None}}}}},
        {"rooms": {"join": {ROOM: {"timeline": {"events": {"0": message("$x")}}}}}},
        {"rooms": {"join": {ROOM: {"timeline": {"events": "events"}}}}},
    ],
)
def test_timelines_of_malformed_sync_is_empty(sync: Any) -> None:
    assert timelines_of(sync) == {}


def test_timelines_of_keeps_what_is_well_formed() -> None:
    good = message("$good")
    sync = {
        "rooms": {
            "join": {
                ROOM: {"timeline": {"events": ["str", None, good, 3, [good]]}},
                OTHER_ROOM: {"timeline": {"events": None}},
                "!c:example.org": None,
                "!d:example.org": {"timeline": {"events": []}},
            },
            "invite": None,
            "leave": [],
        }
    }
    assert timelines_of(sync) == {ROOM: [good], "!d:example.org": []}


def member(state_key: Any, sender: Any, type_: Any = "m.room.member") -> Any:
    return {
        "type": type_,
        "state_key": state_key,
        "sender": sender,
        "content": {"membership": "invite"},
    }


@pytest.mark.parametrize(
    "sync",
    [
        None,
        [],
        "sync",
        {"rooms": None},
        {"rooms": {"invite": None}},
        {"rooms": {"invite": []}},
        {"rooms": {"invite": "invite"}},
        {"rooms": {"invite": {ROOM: None}}},
        {"rooms": {"invite": {ROOM: []}}},
        {"rooms": {"invite": {ROOM: {"invite_state": None}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": []}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": "state"}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": {"events": None}}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": {"events": {"0": member(BOT, USER)}}}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": {"events": [None, "x", 3, []]}}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": {"events": [member(BOT, None)]}}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": {"events": [member(BOT, [USER])]}}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": {"events": [member(BOT, 7)]}}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": {"events": [member([BOT], USER)]}}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": {"events": [member(USER, USER)]}}}}},
        {"rooms": {"invite": {ROOM: {"invite_state": {"events": [member(BOT, USER, None)]}}}}},
    ],
)
def test_parse_invites_malformed_sync_is_empty(sync: Any) -> None:
    assert parse_invites(sync, BOT) == []


def test_parse_invites_keeps_what_is_well_formed() -> None:
    sync = {
        "rooms": {
            "invite": {
                ROOM: {
                    "invite_state": {
                        "events": [
                            None,
                            member(BOT, [USER]),  # sender not a string: skipped
                            {"type": "m.room.name", "content": {"name": "DM"}},
                            member(BOT, USER),
                            member(BOT, "@second:example.org"),  # one per room
                        ]
                    }
                },
                OTHER_ROOM: {"invite_state": "garbage"},
                "!c:example.org": {"invite_state": {"events": [member(BOT, "@carol:example.org")]}},
                "!d:example.org": None,
            },
            "join": None,
        }
    }
    assert parse_invites(sync, BOT) == [(ROOM, USER), ("!c:example.org", "@carol:example.org")]


# --- CatchUp.queue ---------------------------------------------------------------------------


@pytest.fixture
async def closed() -> tuple[StartGate, FakeStage, RoomQueues]:
    gate = StartGate()
    stage = FakeStage(gate=gate)
    return gate, stage, RoomQueues(stage, gate, LOG)


def catch_up(queues: RoomQueues) -> CatchUp:
    return CatchUp(SimpleNamespace(user_id=BOT), queues, LOG)  # type: ignore[arg-type]


def live(event_id: str, room_id: str = ROOM) -> Incoming:
    return Incoming(Kind.MESSAGE, event_id=event_id, room_id=room_id, sender=USER, body=event_id)


def planned(timelines: dict[str, list[Any]], active: set[str]) -> StartPlan:
    return plan_start(timelines, [], {}, BOT, SINCE, active)


async def test_missed_messages_and_commands_go_first_as_one_sequence(
    closed: tuple[StartGate, FakeStage, RoomQueues],
) -> None:
    gate, stage, queues = closed
    try:
        queues.worker(ROOM).push(live("$q3"))  # a live message, queued during the start
        timeline = [
            message("$q1", ts=2_000), message("$clear", body="!clear", ts=3_000),
            message("$q2", ts=4_000),
        ]  # fmt: skip
        catch_up(queues).queue(planned({ROOM: timeline}, active={ROOM}))
        worker = queues.worker(ROOM)
        assert worker.waiting == 3  # q1, q2 and q3 (the command is not a message)
        await settle()
        assert stage.sequence() == []  # nothing taken while the gate is closed
        gate.open()
        await stage.until_done("$q3")
        assert stage.sequence() == ["$q1", "$clear", "$q2", "$q3"]
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


async def test_a_missed_message_of_an_inactive_room_is_not_queued_a_command_is(
    closed: tuple[StartGate, FakeStage, RoomQueues],
) -> None:
    gate, stage, queues = closed
    try:
        timelines = {
            ARCHIVED_ROOM: [message("$archived-msg"), message("$archived-cmd", body="!unarchive")],
            OTHER_ROOM: [message("$dm-cmd", body="!chats"), message("$dm-msg")],  # a DM
            ROOM: [message("$active-msg")],
        }
        catch_up(queues).queue(planned(timelines, active={ROOM}))
        assert queues.worker(ARCHIVED_ROOM).waiting == 0  # only the command
        assert len(queues.worker(ARCHIVED_ROOM).items) == 1
        assert len(queues.worker(OTHER_ROOM).items) == 1
        assert queues.worker(ROOM).waiting == 1
        gate.open()
        await stage.until_done("$active-msg")
        await settle()
        assert stage.order("message") == ["$active-msg"]
        assert sorted(stage.order("command")) == ["$archived-cmd", "$dm-cmd"]
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


async def test_ignored_events_are_not_queued(
    closed: tuple[StartGate, FakeStage, RoomQueues],
) -> None:
    gate, stage, queues = closed
    try:
        edit = {
            "msgtype": "m.text", "body": "* fixed",
            "m.relates_to": {"rel_type": "m.replace", "event_id": "$x"},
        }  # fmt: skip
        bad_cmd = {"msgtype": "m.text", "body": "!clear", "m.relates_to": None}
        timeline = [
            notice("$bot", answers="$x"), message("$edit", content=edit),
            message("$bad", content=None), message("$bad-cmd", content=bad_cmd),
            message("$good"),
        ]  # fmt: skip
        plan = planned({ROOM: timeline}, active={ROOM})
        assert [i.event_id for i in plan.rooms[ROOM]] == ["$good"]
        catch_up(queues).queue(plan)
        gate.open()
        await stage.until_done("$good")
        await settle()
        assert stage.sequence() == ["$good"]
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


async def test_each_room_gets_its_own_head(
    closed: tuple[StartGate, FakeStage, RoomQueues],
) -> None:
    gate, stage, queues = closed
    try:
        queues.worker(ROOM).push(live("$a-live"))
        queues.worker(OTHER_ROOM).push(live("$b-live", OTHER_ROOM))
        timelines = {
            ROOM: [message("$a1"), message("$a2")],
            OTHER_ROOM: [message("$b1"), message("$b2")],
        }
        catch_up(queues).queue(planned(timelines, active={ROOM, OTHER_ROOM}))
        gate.open()
        await stage.until_done("$a-live", "$b-live")
        in_room = [c[2] for c in stage.calls if c[0] == "message" and c[1] == ROOM]
        in_other = [c[2] for c in stage.calls if c[0] == "message" and c[1] == OTHER_ROOM]
        assert in_room == ["$a1", "$a2", "$a-live"]
        assert in_other == ["$b1", "$b2", "$b-live"]
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


async def test_a_command_maubot_dispatched_during_the_start_takes_its_timeline_place(
    closed: tuple[StartGate, FakeStage, RoomQueues],
) -> None:
    # After a maubot process restart the missed events may arrive live while the start runs:
    # the live !clear's slot and q2 are queued before the start's plan of the same events.
    gate, stage, queues = closed
    try:
        queues.worker(ROOM).push(live("$q1"))
        async with queues.in_turn(ROOM, "$clear") as slot:
            slot.set_result(stage.control("clear"))
        queues.worker(ROOM).push(live("$q2"))
        timeline = [
            message("$q1", ts=2_000), message("$clear", body="!clear", ts=3_000),
            message("$q2", ts=4_000), message("$q3", ts=5_000),
        ]  # fmt: skip
        catch_up(queues).queue(planned({ROOM: timeline}, active={ROOM}))
        gate.open()
        await stage.until_done("$q3")
        await settle()
        assert stage.sequence() == ["$q1", "clear", "$q2", "$q3"]  # each once, in order
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


# --- a cut timeline is paged back ---------------------------------------------------------


class PagingHomeserver:
    """A room of ``count`` messages, one a second; /sync holds the newest 50 (limited)."""

    def __init__(self, count: int, fail_at: int | None = None) -> None:
        self.user_id = BOT
        self.events = [
            {"type": "m.room.message", "event_id": f"$m{i}", "sender": USER,
             "origin_server_ts": 1_000_000 + i * 1000, "content": {"msgtype": "m.text", "body": f"m{i}"}}
            for i in range(count)
        ]  # fmt: skip
        self.pages: list[int] = []
        self.fail_at = fail_at

    async def sync(self, query: dict[str, str]) -> dict[str, Any]:
        newest = self.events[-50:]
        timeline = {"events": list(newest), "limited": len(self.events) > 50, "prev_batch": "p50"}
        return {"rooms": {"join": {ROOM: {"timeline": timeline}}}}

    async def earlier(
        self, room_id: str, before: str, limit: int, types: list[str]
    ) -> tuple[list[dict[str, Any]], str | None]:
        from lambda_plugin.matrix import HomeserverError

        if self.fail_at is not None and len(self.pages) == self.fail_at:
            raise HomeserverError(502, None, "bad gateway")
        self.pages.append(limit)
        end = len(self.events) - int(before[1:])
        page = self.events[max(0, end - limit) : end]
        return page, f"p{int(before[1:]) + len(page)}" if end - limit > 0 else None


def read_with(hs: PagingHomeserver, max_events: int = 1000) -> CatchUp:
    return CatchUp(hs, None, LOG, lambda: max_events)  # type: ignore[arg-type]


def bodies(sync: dict[str, Any]) -> list[str]:
    return [e["content"]["body"] for e in timelines_of(sync)[ROOM]]


@pytest.mark.parametrize(
    ("count", "back_to_s", "max_events", "first"),
    [
        (30, 0, 1000, 0),  # not cut: nothing paged
        (260, 0, 1000, 0),  # cut: paged back to the room's start
        (260, 100, 1000, 10),  # back to the window's start (a page's worth before it at most)
        (260, 0, 120, 140),  # at most max_events
    ],
)
async def test_a_cut_timeline_is_paged_back_in_order(
    count: int, back_to_s: int, max_events: int, first: int
) -> None:
    hs = PagingHomeserver(count)
    sync = await read_with(hs, max_events).read(None, 1_000_000 + back_to_s * 1000)
    got = bodies(sync)
    assert got == [f"m{i}" for i in range(first, count)]
    assert len(got) <= max_events


async def test_a_failed_page_keeps_what_was_read() -> None:
    hs = PagingHomeserver(400, fail_at=1)
    sync = await read_with(hs).read(None, 0)
    assert bodies(sync) == [f"m{i}" for i in range(250, 400)]


class RepeatingHomeserver(PagingHomeserver):
    """Pages that hold only known events (or ones with no id), a new position each time."""

    def __init__(self, count: int, page: list[dict[str, Any]] | None = None) -> None:
        super().__init__(count)
        self.page = page

    async def earlier(
        self, room_id: str, before: str, limit: int, types: list[str]
    ) -> tuple[list[dict[str, Any]], str | None]:
        self.pages.append(limit)
        page = self.page if self.page is not None else list(self.events[-50:])
        return page, f"p{len(self.pages)}"


@pytest.mark.parametrize(
    "page", [None, [{"type": "m.room.message", "origin_server_ts": 2_000_000}]]
)
async def test_a_homeserver_paging_on_forever_is_cut_off(page: Any) -> None:
    hs = RepeatingHomeserver(100, page)
    sync = await asyncio.wait_for(read_with(hs, 1000).read(None, 0), 5)
    assert len(hs.pages) == 1  # a page with nothing new ends it
    assert bodies(sync) == [f"m{i}" for i in range(50, 100)]
