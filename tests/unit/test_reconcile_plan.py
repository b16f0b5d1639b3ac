"""reconcile.plan(): the pure heart of the start hook, on hand-made room state."""

from __future__ import annotations

from lambda_plugin.catchup import unanswered
from lambda_plugin.db import ChatRoomRow, UserRow
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


def test_catch_up_picks_unhandled_recent_user_messages_in_order() -> None:
    def msg(event_id: str, sender: str, ts: int, msgtype: str = "m.text") -> dict:
        return {
            "type": "m.room.message", "event_id": event_id, "sender": sender,
            "origin_server_ts": ts, "content": {"msgtype": msgtype, "body": event_id},
        }  # fmt: skip

    timelines = {
        "!c1": [
            msg("$old", USER, 10),
            msg("$done", USER, 200),
            msg("$bot", BOT, 210, "m.notice"),
            msg("$new1", USER, 300),
            msg("$new2", USER, 310, "m.file"),
        ],
        "!other": [msg("$elsewhere", USER, 400)],
    }
    found = unanswered(timelines, {"!c1"}, BOT, since_ms=100, handled={"$done"})
    assert [e["event_id"] for _, e in found] == ["$new1", "$new2"]


def test_catch_up_after_a_lost_database_skips_what_the_bot_already_answered() -> None:
    def msg(event_id: str, sender: str, ts: int) -> dict:
        return {
            "type": "m.room.message", "event_id": event_id, "sender": sender,
            "origin_server_ts": ts, "content": {"msgtype": "m.text", "body": event_id},
        }  # fmt: skip

    timelines = {
        "!c1": [msg("$asked", USER, 300), msg("$answer", BOT, 301), msg("$while_down", USER, 302)]
    }
    found = unanswered(timelines, {"!c1"}, BOT, since_ms=100, handled=set())
    assert [e["event_id"] for _, e in found] == ["$while_down"]


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
