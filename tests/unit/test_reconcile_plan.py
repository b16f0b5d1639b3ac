"""reconcile.plan() and catchup.plan_start(): the pure hearts of the start hook, on
hand-made room state and ledger rows."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from lambda_plugin.catchup import StartPlan, plan_start
from lambda_plugin.db import ChatRoomRow, LedgerRow, UserRow
from lambda_plugin.intake import ANSWERING, ANSWERS, Kind, classify
from lambda_plugin.ledger import DONE, Fate, row_of
from lambda_plugin.marker import KIND_CHAT, KIND_SPACE, MARKER_TYPE, Marker
from lambda_plugin.reconcile import adopted_platform_chat_id, plan

BOT = "@bot:hs"
USER = "@u:hs"


def room(room_id: str, creator: str = BOT, space: bool = False, ts: int = 1, **extra) -> list:
    events = [
        {
            "type": "m.room.create",
            "state_key": "",
            "sender": creator,
            "origin_server_ts": ts,
            "content": {"type": "m.space"} if space else {},
        }
    ]
    for event_type, key, content, sender in extra.get("state", []):
        events.append({"type": event_type, "state_key": key, "content": content, "sender": sender})
    return events


def marker(m: Marker, sender: str = BOT) -> tuple:
    return (MARKER_TYPE, "", m.content(), sender)


def chat_marker(chat_id: str, pcid: str, archived: bool = False) -> Marker:
    return Marker(KIND_CHAT, USER, "!space", chat_id, "echo", pcid, archived)


def topology() -> dict:
    return {
        "!space": room(
            "!space",
            space=True,
            state=[
                marker(Marker(KIND_SPACE, USER)),
                ("m.space.child", "!c1", {"via": ["hs"]}, BOT),
                ("m.space.child", "!c2", {"via": ["hs"]}, BOT),
            ],
        ),
        "!c1": room(
            "!c1",
            ts=2,
            state=[
                marker(chat_marker("C1", "p1")),
                ("m.room.name", "", {"name": "First"}, USER),
                ("m.space.parent", "!space", {"via": ["hs"], "canonical": True}, BOT),
            ],
        ),
        "!c2": room(
            "!c2",
            ts=3,
            state=[
                marker(chat_marker("C2", "p2", archived=True)),
                ("m.space.parent", "!space", {"via": ["hs"], "canonical": True}, BOT),
            ],
        ),
    }


def run(states: dict, users: dict | None = None, rooms: dict | None = None):
    return plan(states, BOT, "hs", users or {}, rooms or {}, "echo")


def test_empty_database_is_restored_from_the_rooms() -> None:
    result = run(topology())
    report = result.report
    assert (report.joined_rooms, report.restored_chat_rows, report.restored_user_meta) == (3, 2, 1)
    assert result.users[USER].space_id == "!space" and result.users[USER].next_chat_index == 3
    first, second = result.rooms["!c1"], result.rooms["!c2"]
    assert (first.chat_id, first.name, first.platform_chat_id) == ("C1", "First", "p1")
    assert second.archived and second.platform_chat_id == "p2"
    # The archived room is still listed in the Space (with via): the link is repaired.
    assert ("!space", "m.space.child", "!c2", {}) in result.state_writes


def test_second_run_on_the_result_writes_nothing() -> None:
    states = topology()
    first = run(states)
    states["!space"].append(
        {"type": "m.space.child", "state_key": "!c2", "content": {}, "sender": BOT}
    )
    second = run(states, first.users, first.rooms)
    assert second.report.writes == 0, second


def test_forged_and_foreign_markers_are_ignored() -> None:
    states = topology()
    states["!forged"] = room("!forged", creator=USER, state=[marker(chat_marker("C9", "x"), USER)])
    states["!mine"] = room("!mine", creator=USER, state=[marker(chat_marker("C8", "y"), BOT)])
    result = run(states)
    assert "!forged" not in result.rooms and "!mine" not in result.rooms
    assert result.report.skipped_rooms == 2


def test_unmarked_child_is_adopted_deterministically() -> None:
    states = topology()
    states["!space"].append(
        {"type": "m.space.child", "state_key": "!old", "content": {"via": ["hs"]}, "sender": BOT}
    )
    states["!old"] = room("!old", ts=9, state=[("m.room.name", "", {"name": "Old"}, BOT)])
    result = run(states)
    adopted = result.rooms["!old"]
    assert adopted.chat_id == "C3" and adopted.platform_chat_id == adopted_platform_chat_id("!old")
    assert any(w[0] == "!old" and w[1] == MARKER_TYPE for w in result.state_writes)
    assert run(states).rooms["!old"] == adopted


def test_duplicate_chat_ids_are_a_conflict_resolved_by_age() -> None:
    states = topology()
    states["!c3"] = room("!c3", ts=5, state=[marker(chat_marker("C1", "p3"))])
    result = run(states)
    assert result.report.conflicts == 1
    assert result.rooms["!c1"].chat_id == "C1" and result.rooms["!c3"].chat_id == "C3"


def test_rooms_the_bot_left_are_marked_gone_not_recreated() -> None:
    known = ChatRoomRow("!lost", USER, "C7", "Lost", "echo", "p7", False, False, 1)
    result = run(topology(), {USER: UserRow(USER, "!space", 8, 1)}, {"!lost": known})
    assert result.rooms["!lost"].gone and result.report.gone_rooms == 1
    assert result.users.get(USER) is None or result.users[USER].next_chat_index == 8


# catch-up: catchup.plan_start, the pure plan of what a start runs


def msg(
    event_id: Any, sender: str = USER, ts: int = 300, msgtype: str = "m.text", **content
) -> dict:
    return {
        "type": "m.room.message", "event_id": event_id, "sender": sender,
        "origin_server_ts": ts, "content": {"msgtype": msgtype, "body": str(event_id), **content},
    }  # fmt: skip


def answer(event_id: str, answers: str, ts: int = 301) -> dict:
    """The bot's finished answer, naming the message it answers."""
    return msg(event_id, BOT, ts, "m.notice", **{ANSWERS: answers})


def partial(event_id: str, answering: str, ts: int = 301) -> dict:
    """The bot's first event of a streamed answer that did not finish."""
    return msg(event_id, BOT, ts, "m.notice", **{ANSWERING: answering})


def unfinished(
    room_id: str, event: dict, fate: Fate = Fate.SEEN, answer_event: str = ""
) -> LedgerRow:
    """A ledger row left seen or taken (the process died), holding the event as queued."""
    row = row_of(classify({**event, "room_id": room_id}, BOT), fate)
    return dataclasses.replace(row, answer_event=answer_event or None)


def ids(plan: StartPlan) -> dict[str, list[str]]:
    return {room_id: [i.event_id for i in items] for room_id, items in plan.rooms.items()}


def test_catch_up_picks_unhandled_recent_user_messages_in_order() -> None:
    timelines = {
        "!c1": [
            msg("$old", ts=10),
            msg("$done", ts=200),
            msg("$bot", BOT, 210, "m.notice"),
            msg("$new1", ts=300),
            msg("$new2", ts=310, msgtype="m.file"),
            msg("$cmd", ts=320, body="!chats"),
        ],
        "!other": [msg("$elsewhere", ts=400), msg("$command", ts=400, body="!help")],
    }
    plan = plan_start(timelines, [], {"$done": "answered"}, BOT, since_ms=100, active={"!c1"})
    # Messages only in active rooms; commands (answered by their handlers) everywhere.
    assert ids(plan) == {"!c1": ["$new1", "$new2", "$cmd"], "!other": ["$command"]}
    assert [i.kind for i in plan.rooms["!c1"]] == [Kind.MESSAGE, Kind.MESSAGE, Kind.COMMAND]
    assert plan.count == 4 and plan.answered == []
    assert ids(plan_start(timelines, [], {"$done": "answered"}, BOT, 100)) == {
        "!c1": ["$new1", "$new2", "$cmd"], "!other": ["$elsewhere", "$command"],
    }  # fmt: skip


def test_catch_up_after_a_lost_database_skips_what_the_bot_already_answered() -> None:
    # No ledger at all (a lost database): the answer in the room names what it answers.
    timelines = {
        "!c1": [msg("$asked", ts=300), answer("$answer", "$asked"), msg("$while_down", ts=302)]
    }
    plan = plan_start(timelines, [], {}, BOT, since_ms=100)
    assert ids(plan) == {"!c1": ["$while_down"]}


def test_an_answer_in_another_room_answers_nothing_here() -> None:
    timelines = {"!c1": [msg("$asked")], "!c2": [answer("$answer", "$asked")]}
    assert ids(plan_start(timelines, [], {}, BOT, since_ms=100)) == {"!c1": ["$asked"]}


def test_an_unfinished_message_answered_in_the_room_is_reported_not_run() -> None:
    # The answer reached the room, then the process died before the ledger said so.
    asked = msg("$asked")
    timelines = {"!c1": [asked, answer("$answer", "$asked")]}
    plan = plan_start(
        timelines, [unfinished("!c1", asked, Fate.TAKEN)], {"$asked": "taken"}, BOT, 0
    )
    assert plan.rooms == {} and plan.answered == ["$asked"]


def test_older_than_the_window_is_skipped_unless_unfinished_in_the_ledger() -> None:
    stale, kept = msg("$stale", ts=50), msg("$died", ts=40)
    timelines = {"!c1": [kept, stale, msg("$recent", ts=300)]}
    plan = plan_start(timelines, [unfinished("!c1", kept)], {"$died": "seen"}, BOT, since_ms=100)
    assert ids(plan) == {"!c1": ["$died", "$recent"]}


@pytest.mark.parametrize("fate", [Fate.SEEN, Fate.TAKEN])
def test_unfinished_ledger_rows_are_run_however_old_even_out_of_the_timeline(fate: Fate) -> None:
    rows = [
        unfinished("!c1", msg("$ancient", ts=1), fate),
        unfinished("!quiet", msg("$cmd", ts=2, body="!chats"), fate),
    ]
    plan = plan_start({}, rows, {}, BOT, since_ms=10**15)
    assert ids(plan) == {"!c1": ["$ancient"], "!quiet": ["$cmd"]}
    [ancient] = plan.rooms["!c1"]
    assert (ancient.kind, ancient.body, ancient.sender) == (Kind.MESSAGE, "$ancient", USER)
    assert ancient.timestamp == 1
    [command] = plan.rooms["!quiet"]
    assert (command.kind, command.command) == (Kind.COMMAND, "chats")


def test_an_unfinished_row_without_a_readable_event_is_skipped() -> None:
    good = unfinished("!c1", msg("$good"))
    broken = [
        dataclasses.replace(unfinished("!c1", msg("$none")), event=None),  # migrated: no JSON
        dataclasses.replace(unfinished("!c1", msg("$junk")), event="{not json"),
        dataclasses.replace(unfinished("!c1", msg("$list")), event="[1, 2]"),
        dataclasses.replace(unfinished("!c1", msg("$other")), event=json.dumps(msg("$else"))),
        dataclasses.replace(unfinished("!c1", msg("$bots")), event=json.dumps(msg("$bots", BOT))),
    ]
    assert ids(plan_start({}, [*broken, good], {}, BOT, 0)) == {"!c1": ["$good"]}


def test_one_event_from_two_sources_is_run_once() -> None:
    # The catch-up's read and maubot's first sync both hold it, and the ledger left it unfinished.
    event = msg("$twice", ts=300)
    timelines = {"!c1": [msg("$first", ts=200), event, dict(event), msg("$last", ts=400)]}
    plan = plan_start(timelines, [unfinished("!c1", event)], {"$twice": "seen"}, BOT, since_ms=100)
    assert ids(plan) == {"!c1": ["$first", "$twice", "$last"]}


def test_timeline_order_is_kept_across_rooms_and_kinds() -> None:
    timelines = {
        "!c1": [
            msg(f"$m{i}", ts=100 + i, **({"body": "!reset"} if i % 3 == 0 else {}))
            for i in range(12)
        ],
        "!c2": [msg("$x", ts=104), msg("$y", ts=106)],
    }
    plan = plan_start(timelines, [], {}, BOT, since_ms=0)
    assert ids(plan) == {"!c1": [f"$m{i}" for i in range(12)], "!c2": ["$x", "$y"]}
    # An unfinished one from the ledger takes its place by time among the timeline's.
    late = unfinished("!c2", msg("$between", ts=105))
    plan = plan_start({"!c2": timelines["!c2"]}, [late], {}, BOT, since_ms=0)
    assert ids(plan) == {"!c2": ["$x", "$between", "$y"]}


def test_timeline_order_is_kept_when_the_senders_clocks_disagree() -> None:
    # origin_server_ts is each sender's homeserver's clock; the timeline's order is the room's.
    timelines = {"!c1": [msg("$a", ts=300), msg("$b", "@v:other", ts=200), msg("$c", ts=400)]}
    assert ids(plan_start(timelines, [], {}, BOT, since_ms=0)) == {"!c1": ["$a", "$b", "$c"]}


@pytest.mark.parametrize("state", sorted(DONE | {Fate.KEPT.value}))
def test_an_event_the_ledger_ended_or_keeps_is_not_run(state: str) -> None:
    timelines = {"!c1": [msg("$ended"), msg("$cmd", body="!chats"), msg("$new", ts=301)]}
    plan = plan_start(timelines, [], {"$ended": state, "$cmd": state}, BOT, since_ms=100)
    assert ids(plan) == {"!c1": ["$new"]}


@pytest.mark.parametrize("state", [Fate.SEEN.value, Fate.TAKEN.value])
def test_an_event_the_ledger_has_unfinished_is_run(state: str) -> None:
    plan = plan_start({"!c1": [msg("$e")]}, [], {"$e": state}, BOT, since_ms=100)
    assert ids(plan) == {"!c1": ["$e"]}


@pytest.mark.parametrize("event_id", [5, None, ["$x"], {"id": "$x"}, True, ""])
def test_a_malformed_event_id_is_skipped_without_raising(event_id: Any) -> None:
    timelines = {
        "!c1": [
            msg(event_id),
            {**answer("$a", "$ok"), "event_id": event_id},  # the bot's, malformed too
            {**partial("$p", "$ok"), "event_id": event_id},
            msg("$ok"),
        ]
    }
    plan = plan_start(timelines, [], {}, BOT, since_ms=100)
    # The answer names "$ok" whatever its own id: it is answered.
    assert ids(plan) == {}
    timelines["!c1"] = [timelines["!c1"][0], msg("$ok")]
    assert ids(plan_start(timelines, [], {}, BOT, since_ms=100)) == {"!c1": ["$ok"]}


@pytest.mark.parametrize(
    "junk",
    [
        {**msg("$j"), "origin_server_ts": "300"},
        {**msg("$j"), "content": "text"},
        {**msg("$j"), "content": {"msgtype": "m.text", "body": 5}},
        {**msg("$j"), "sender": 7},
        {**msg("$j"), "type": "m.room.member"},
        msg("$j", **{"m.relates_to": {"rel_type": "m.replace", "event_id": "$ok"}}),
        answer("$j", {"not": "an id"}),  # type: ignore[arg-type]
    ],
)
def test_malformed_events_are_skipped_without_raising(junk: dict) -> None:
    plan = plan_start({"!c1": [junk, msg("$ok")]}, [], {}, BOT, since_ms=100)
    assert ids(plan) == {"!c1": ["$ok"]}


def test_a_partial_answer_is_not_the_answer_and_is_finished_in_place() -> None:
    timelines = {"!c1": [msg("$q"), partial("$p1", "$q"), partial("$p2", "$q", ts=302)]}
    plan = plan_start(timelines, [], {}, BOT, since_ms=100)
    [question] = plan.rooms["!c1"]
    assert question.event_id == "$q" and question.resume == "$p1"  # the stream's first event
    # The ledger's record of the stream's first event wins over the room's.
    row = unfinished("!c1", msg("$q"), Fate.TAKEN, answer_event="$p1")
    [question] = plan_start(timelines, [row], {"$q": "taken"}, BOT, since_ms=100).rooms["!c1"]
    assert question.resume == "$p1"
    # A row that never recorded it (died before) takes the room's.
    bare = unfinished("!c1", msg("$q"), Fate.TAKEN)
    [question] = plan_start(timelines, [bare], {"$q": "taken"}, BOT, since_ms=100).rooms["!c1"]
    assert question.resume == "$p1"


def test_adopted_rooms_never_take_the_number_of_a_room_the_bot_left() -> None:
    states = topology()
    states["!space"].append(
        {"type": "m.space.child", "state_key": "!old", "content": {"via": ["hs"]}, "sender": BOT}
    )
    states["!old"] = room("!old", ts=9)
    kicked = ChatRoomRow("!kicked", USER, "C3", "Kicked", "echo", "p9", False, True, 1)
    result = run(states, {USER: UserRow(USER, "!space", 4, 1)}, {"!kicked": kicked})
    assert result.rooms["!old"].chat_id == "C4"
    assert result.users[USER].next_chat_index == 5


def test_sync_positions_hand_out_one_old_enough() -> None:
    import time

    from lambda_plugin.catchup import SyncPositions

    positions = SyncPositions()
    now = time.time()
    positions.seen.extend([(now - 700, "s1"), (now - 650, "s2"), (now - 10, "s3")])
    assert positions.older_than(600) == "s2"
    assert positions.older_than(600) == "s2"  # still the answer until a newer one ages
    assert positions.older_than(5) == "s3"
    assert SyncPositions().older_than(600) is None
