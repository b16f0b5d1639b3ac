"""Reconciliation on rooms a hostile or careless room maker shaped: what it reads can't be
forged, can't crash it, and can't smuggle in what the plugin would refuse elsewhere."""

from __future__ import annotations

from typing import Any

from lambda_plugin.marker import KIND_CHAT, KIND_SPACE, MARKER_TYPE, Marker
from lambda_plugin.reconcile import plan
from lambda_plugin.roomstate import NAME_MAX, parse_room

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
