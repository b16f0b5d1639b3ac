"""Reconciliation on rooms a hostile or careless room maker shaped: what it reads can't be
forged, can't crash it, and can't smuggle in what the plugin would refuse elsewhere."""

from __future__ import annotations

from typing import Any

import pytest

from lambda_plugin.db import ChatRoomRow, UserRow
from lambda_plugin.marker import KIND_CHAT, KIND_SPACE, MARKER_TYPE, Marker
from lambda_plugin.reconcile import plan
from lambda_plugin.roomstate import (
    BOT_LEVEL,
    NAME_MAX,
    PROTECTED_EVENTS,
    parse_room,
    power_levels,
    raised_power_levels,
)

BOT = "@bot:hs"
USER = "@u:hs"


def event(etype: str, content: Any, key: Any = "", sender: Any = BOT, ts: Any = 1) -> dict:
    return {
        "type": etype,
        "state_key": key,
        "content": content,
        "sender": sender,
        "origin_server_ts": ts,
    }


def create(space: bool = False, sender: str = BOT, ts: int = 1, **content: Any) -> dict:
    return event(
        "m.room.create", {**content, **({"type": "m.space"} if space else {})}, "", sender, ts
    )


def chat_marker(chat_id: str = "C1", pcid: str = "p1", space_id: str = "!space") -> dict:
    return Marker(KIND_CHAT, USER, space_id, chat_id, "echo", pcid).content()


def run(states: dict, users: dict | None = None, rooms: dict | None = None):
    return plan(states, BOT, "hs", users or {}, rooms or {}, "echo")


# D. Names read at start are cleaned and cut like every other name.


def test_names_read_at_start_are_cleaned_and_cut() -> None:
    raw = "Plan\u202e\n\u200bA" + "x" * 65_000 + "\n"
    room = parse_room("!r", [create(), event("m.room.name", {"name": raw})], BOT)
    assert room.name is not None and len(room.name) == NAME_MAX
    assert room.name.startswith("Plan A" + "x")
    assert all(c.isprintable() for c in room.name)


def test_names_of_nothing_but_control_characters_are_no_names() -> None:
    room = parse_room("!r", [create(), event("m.room.name", {"name": "\n\u200e\t"})], BOT)
    assert room.name is None
    states = {
        "!space": [create(space=True), event(MARKER_TYPE, Marker(KIND_SPACE, USER).content())],
        "!r": [
            create(ts=2),
            event(MARKER_TYPE, chat_marker()),
            event("m.room.name", {"name": "\n"}),
        ],
    }
    assert run(states).rooms["!r"].name == "C1"


# B. "Created by the bot" comes from the create event's sender, never from its content.


def test_a_create_event_claiming_the_bot_as_creator_is_not_trusted() -> None:
    space = [create(space=True), event(MARKER_TYPE, Marker(KIND_SPACE, USER).content())]
    space.append(event("m.space.child", {"via": ["hs"]}, "!claims"))
    space.append(event("m.space.child", {"via": ["hs"]}, "!unmarked"))
    # Room v11 on: content.creator is whatever the room maker wrote. Both rooms hold a
    # marker the bot really sent (the bot was once given power there) or none at all.
    claims = [create(sender=USER, ts=2, creator=BOT), event(MARKER_TYPE, chat_marker())]
    unmarked = [create(sender=USER, ts=3, creator=BOT)]
    states = {"!space": space, "!claims": claims, "!unmarked": unmarked}
    assert parse_room("!claims", claims, BOT).creator == USER
    result = run(states)
    assert "!claims" not in result.rooms and "!unmarked" not in result.rooms
    assert result.report.skipped_rooms == 2
    assert not any(w[0] in ("!claims", "!unmarked") for w in result.state_writes)


# C. A malformed event is skipped; the room and the run go on.

GOOD_CHAT = [
    create(ts=2),
    event(MARKER_TYPE, chat_marker()),
    event("m.room.name", {"name": "Good"}),
    event("m.space.parent", {"via": ["hs"], "canonical": True}, "!space"),
]
MALFORMED = [
    None,
    "m.room.name",
    5,
    [],
    {"type": ["m.room.name"], "state_key": "", "content": {}},
    {"type": "m.room.name", "state_key": ""},  # no content
    event("m.room.create", {}, ts="7"),
    event("m.room.create", {}, ts="abc"),
    event("m.room.create", {}, ts=1.5),
    event("m.room.create", {}, ts=True),
    event("m.room.create", {}, ts=None),
    event("m.room.create", {"type": 5}),
    event("m.room.create", {"type": ["m.space"]}),
    event("m.room.create", {}, sender=5),
    event("m.room.create", [], ts=3),
    event("m.room.name", {"name": 5}),
    event("m.room.name", {"name": ["Bad"]}),
    event("m.room.name", "Bad"),
    event("m.room.tombstone", {"replacement_room": 5}),
    event("m.room.tombstone", {"replacement_room": {"id": "!new"}}),
    event("m.space.parent", {"via": "hs"}, "!other"),
    event("m.space.parent", {"via": {"hs": 1}}, "!other"),
    event("m.space.parent", {"via": ["hs"]}, 5),
    event("m.space.parent", {"via": ["hs"]}, None),
    event("m.space.parent", {"via": ["hs"]}, ["!other"]),
    event("m.space.child", {"via": ["hs"]}, {"!c": 1}),
    event(MARKER_TYPE, chat_marker(chat_id="C9"), key=5),
    event(MARKER_TYPE, chat_marker(chat_id="C9"), key=None),
]


def test_malformed_events_are_skipped_and_the_good_ones_kept() -> None:
    room = parse_room("!c1", GOOD_CHAT + MALFORMED, BOT)
    assert (room.creator, room.created_ts, room.is_space, room.tombstoned) == (BOT, 2, False, False)
    assert room.name == "Good"
    assert room.marker == Marker.from_content(chat_marker())
    assert room.parents == {"!space": True} and room.children == {}


def test_answers_that_are_no_event_list_are_empty_rooms() -> None:
    for answer in (None, "text", 5, {"type": "m.room.create"}):
        room = parse_room("!r", answer, BOT)  # type: ignore[arg-type]
        assert room.creator is None and room.marker is None


MALFORMED_MARKERS = [
    {**chat_marker(), "version": "abc"},
    {**chat_marker(), "version": 1.5},
    {**chat_marker(), "version": True},
    {**chat_marker(), "archived": "yes"},
    {**chat_marker(), "archived": 1},
    {**chat_marker(), "space_id": 5},
    {**chat_marker(), "chat_id": 5},
    {**chat_marker(), "agent_id": ["echo"]},
    {**chat_marker(), "platform_chat_id": {"id": "p"}},
    {**chat_marker(), "owner": 5},
    {**chat_marker(), "owner": ""},
    {**chat_marker(), "kind": ["chat"]},
    {**chat_marker(), "kind": {"chat": 1}},
    {"kind": "space", "owner": USER, "space_id": 5},
    {"kind": "space", "owner": USER, "version": "2"},
    {"kind": "space", "owner": USER, "chat_id": 7},
    None,
    "text",
    [],
]


def test_marker_from_content_never_raises_on_wrong_types() -> None:
    for content in MALFORMED_MARKERS:
        assert Marker.from_content(content) is None, content  # type: ignore[arg-type]
    assert Marker.from_content({"kind": "space", "owner": USER}) == Marker(KIND_SPACE, USER)
    nulls = {"kind": "space", "owner": USER, "space_id": None, "archived": None, "version": None}
    assert Marker.from_content(nulls) == Marker(KIND_SPACE, USER)  # null reads as absent
    assert Marker.from_content(chat_marker()) == Marker(
        KIND_CHAT, USER, "!space", "C1", "echo", "p1"
    )


def test_a_room_full_of_malformed_events_does_not_stop_the_run() -> None:
    space = [
        create(space=True),
        event(MARKER_TYPE, Marker(KIND_SPACE, USER).content()),
        *(event("m.space.child", {"via": ["hs"]}, f"!m{i}") for i in range(len(MALFORMED_MARKERS))),
        event("m.space.child", {"via": ["hs"]}, "!c1"),
        *MALFORMED,
    ]
    states: dict[str, Any] = {"!space": space, "!c1": GOOD_CHAT + MALFORMED, "!none": None}
    for i, content in enumerate(MALFORMED_MARKERS):
        states[f"!m{i}"] = [create(ts=10 + i), event(MARKER_TYPE, content), *MALFORMED]
    result = run(states)
    good = result.rooms["!c1"]
    assert (good.chat_id, good.name, good.platform_chat_id) == ("C1", "Good", "p1")
    assert result.users[USER].space_id == "!space"
    # Rooms whose marker can't be read are the bot's rooms in the user's Space: adopted,
    # numbered after the good one, their markers rewritten whole.
    adopted = sorted(
        (result.rooms[f"!m{i}"] for i in range(len(MALFORMED_MARKERS))), key=lambda r: r.created_at
    )
    assert [r.chat_id for r in adopted] == [f"C{n}" for n in range(2, 2 + len(MALFORMED_MARKERS))]
    rewritten = {w[0] for w in result.state_writes if w[1] == MARKER_TYPE}
    assert rewritten == {r.room_id for r in adopted}
    assert result.report.skipped_rooms == 1  # "!none"


# A. Owners can't wipe the bot's markers; rooms that let them are repaired, and a marker
# already emptied is restored from the database.

POWER = "m.room.power_levels"
OLD_LEVELS = {  # what Synapse gives a private room by default: the plugin's state at 50
    "users": {BOT: 100, USER: 50},
    "users_default": 0,
    "events": {"m.room.name": 50, "m.room.power_levels": 100, "m.room.tombstone": 100},
    "events_default": 0,
    "state_default": 50,
    "ban": 50,
    "kick": 50,
    "redact": 50,
    "invite": 0,
    "historical": 100,
}


def managed(levels: dict | None = None, chat_levels: dict | None = None) -> dict:
    """A user's Space and one chat room, with the given power levels."""
    space = [
        create(space=True),
        event(MARKER_TYPE, Marker(KIND_SPACE, USER).content()),
        event("m.space.child", {"via": ["hs"], "order": "00000001"}, "!c1"),
    ]
    chat = [
        create(ts=2),
        event(MARKER_TYPE, chat_marker()),
        event("m.room.name", {"name": "Chat 1"}),
        event("m.space.parent", {"via": ["hs"], "canonical": True}, "!space"),
    ]
    if levels is not None:
        space.append(event(POWER, levels))
    if chat_levels is not None or levels is not None:
        chat.append(event(POWER, chat_levels if chat_levels is not None else levels))
    return {"!space": space, "!c1": chat}


def applied(states: dict, result) -> dict:
    """The rooms after the plan's state writes (the newest event of a type and key wins)."""
    for room_id, etype, key, content in result.state_writes:
        states[room_id].append(event(etype, content, key))
    return states


def test_the_plugins_rooms_keep_redaction_at_the_bots_level() -> None:
    levels = power_levels(USER, BOT, privileged=False)
    assert levels["redact"] == BOT_LEVEL
    assert raised_power_levels(levels) is None


def test_rooms_that_let_users_redact_get_their_power_levels_raised() -> None:
    states = managed(OLD_LEVELS)
    known_users = {USER: UserRow(USER, "!space", 2, 1)}
    result = run(states, known_users)
    writes = {w[0]: w[3] for w in result.state_writes if w[1] == POWER and w[2] == ""}
    assert set(writes) == {"!space", "!c1"} and result.report.repaired_power_levels == 2
    fixed = writes["!c1"]
    assert fixed["redact"] == BOT_LEVEL
    assert all(fixed["events"][t] == BOT_LEVEL for t in PROTECTED_EVENTS)
    # Everything else is kept as it was: users, other levels, other events.
    assert fixed["users"] == OLD_LEVELS["users"] and fixed["events"]["m.room.name"] == 50
    assert {k: v for k, v in fixed.items() if k not in ("redact", "events")} == {
        k: v for k, v in OLD_LEVELS.items() if k not in ("redact", "events")
    }
    again = run(applied(states, result), known_users, result.rooms)
    assert again.report.writes == 0 and again.report.repaired_power_levels == 0


def test_levels_of_the_wrong_type_count_as_too_low_and_are_rewritten() -> None:
    odd = {**OLD_LEVELS, "redact": "100", "events": {MARKER_TYPE: True, POWER: 100.0}}
    fixed = raised_power_levels(odd)
    assert fixed is not None and fixed["redact"] == BOT_LEVEL
    assert all(type(fixed["events"][t]) is int for t in PROTECTED_EVENTS)
    assert raised_power_levels({**OLD_LEVELS, "events": ["not", "a", "map"]}) is None
    states = managed(chat_levels={**OLD_LEVELS, "events": "x", "users": 5})
    result = run(states)  # a power-levels event that can't be read is skipped, never fatal
    assert result.rooms["!c1"].chat_id == "C1"


def test_consistent_rooms_get_no_power_level_write() -> None:
    levels = power_levels(USER, BOT, privileged=False)
    result = run(managed(levels), {USER: UserRow(USER, "!space", 2, 1)})
    assert not [w for w in result.state_writes if w[1] == POWER]
    privileged = power_levels(USER, BOT, privileged=True)  # room v12: the bot is no user
    assert raised_power_levels(privileged) is None


def test_rooms_the_plugin_does_not_manage_keep_their_power_levels() -> None:
    states = managed(power_levels(USER, BOT, privileged=False))
    states["!dm"] = [create(sender=USER), event(POWER, OLD_LEVELS, sender=USER)]
    states["!orphan"] = [create(ts=5), event(POWER, OLD_LEVELS)]  # the bot's, in no Space
    result = run(states)
    assert not [w for w in result.state_writes if w[1] == POWER]


def test_adopted_rooms_get_their_power_levels_raised_too() -> None:
    states = managed(power_levels(USER, BOT, privileged=False))
    states["!space"].append(event("m.space.child", {"via": ["hs"]}, "!old"))
    states["!old"] = [create(ts=3), event(POWER, OLD_LEVELS)]
    result = run(states)
    assert [w[0] for w in result.state_writes if w[1] == POWER] == ["!old"]


def emptied(states: dict, room_id: str, content: Any = None) -> dict:
    """The room's marker as a redaction leaves it: sent by the bot, its content gone."""
    states[room_id] = [e for e in states[room_id] if e["type"] != MARKER_TYPE]
    states[room_id].append(event(MARKER_TYPE, {} if content is None else content))
    return states


def test_an_emptied_chat_marker_is_restored_from_the_database() -> None:
    first = run(managed())
    known_users, known_rooms = first.users, first.rooms
    row = known_rooms["!c1"]
    for content in ({}, {"kind": "chat"}, "gone"):
        states = emptied(managed(), "!c1", content)
        result = run(states, known_users, known_rooms)
        assert "!c1" not in result.rooms  # the row stays as the database has it
        assert result.users == {} and result.report.conflicts == 0
        marker = [w for w in result.state_writes if w[:3] == ("!c1", MARKER_TYPE, "")]
        assert marker == [("!c1", MARKER_TYPE, "", Marker.for_chat(row, "!space").content())]
        assert result.report.restored_room_meta == 1 and result.report.writes == 1
        again = run(applied(states, result), known_users, known_rooms)
        assert again.report.writes == 0


def test_an_emptied_chat_marker_keeps_its_ids_when_the_room_was_renamed() -> None:
    first = run(managed())
    states = emptied(managed(), "!c1")
    states["!c1"].append(event("m.room.name", {"name": "Renamed"}, sender=USER))
    result = run(states, first.users, first.rooms)
    row = result.rooms["!c1"]
    known = first.rooms["!c1"]
    assert (row.chat_id, row.platform_chat_id, row.name) == (
        known.chat_id,
        known.platform_chat_id,
        "Renamed",
    )


def test_an_emptied_space_marker_stays_the_users_space() -> None:
    first = run(managed())
    states = emptied(managed(), "!space")
    result = run(states, first.users, first.rooms)
    assert result.users == {} and result.rooms == {}
    assert result.state_writes == [("!space", MARKER_TYPE, "", Marker(KIND_SPACE, USER).content())]
    assert result.report.restored_room_meta == 1
    assert run(applied(states, result), first.users, first.rooms).report.writes == 0


def test_an_emptied_marker_the_database_does_not_know_is_not_trusted() -> None:
    states = emptied(managed(), "!space")
    result = run(states)
    assert USER not in result.users or result.users[USER].space_id is None
    assert not [w for w in result.state_writes if w[0] == "!space"]
    # Someone else's database row does not make a room the bot did not make its own.
    states = emptied(managed(), "!c1")
    states["!c1"][0] = create(sender=USER, ts=2)
    known = ChatRoomRow("!c1", USER, "C1", "Chat 1", "echo", "p1", False, False, 2)
    result = run(states, {USER: UserRow(USER, "!space", 2, 1)}, {"!c1": known})
    assert not [w for w in result.state_writes if w[0] == "!c1" and w[1] == MARKER_TYPE]


# B. Rooms made open to guests (the private_chat preset, before rooms were made closed) are
# closed; rooms the plugin does not manage are left as they are.

GUESTS = "m.room.guest_access"
CLOSED = {"guest_access": "forbidden"}


@pytest.mark.parametrize(
    "opened", [{"guest_access": "can_join"}, {"guest_access": 5}, {"guest_access": None}]
)
def test_managed_rooms_open_to_guests_are_closed_once(opened: dict) -> None:
    states = managed(power_levels(USER, BOT, privileged=False))
    for room_id in ("!space", "!c1"):
        states[room_id].append(event(GUESTS, opened))
    states["!dm"] = [create(sender=USER), event(GUESTS, opened, sender=USER)]
    states["!orphan"] = [create(ts=5), event(GUESTS, opened)]  # the bot's, in no Space
    known_users = {USER: UserRow(USER, "!space", 2, 1)}
    result = run(states, known_users)
    writes = sorted(w for w in result.state_writes if w[1] == GUESTS)
    assert writes == [("!c1", GUESTS, "", CLOSED), ("!space", GUESTS, "", CLOSED)]
    assert result.report.repaired_guest_access == 2
    again = run(applied(states, result), known_users, result.rooms)
    assert again.report.writes == 0 and again.report.repaired_guest_access == 0


@pytest.mark.parametrize("content", [CLOSED, {}, "not a map", {"guest_access": "forbidden", "x": 1}])
def test_rooms_closed_to_guests_or_unreadable_get_no_guest_write(content: Any) -> None:
    states = managed(power_levels(USER, BOT, privileged=False))
    states["!c1"].append(event(GUESTS, content))
    result = run(states, {USER: UserRow(USER, "!space", 2, 1)})
    assert not [w for w in result.state_writes if w[1] == GUESTS]
    assert result.report.repaired_guest_access == 0
    assert parse_room("!c1", states["!c1"], BOT).guests_open is False
