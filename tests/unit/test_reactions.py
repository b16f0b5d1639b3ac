"""🛑 on a running answer stops it, for the room's owner only."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from lambda_plugin.db import ChatRoomRow
from lambda_plugin.intake import ANSWERING, ANSWERS, Incoming, Kind
from lambda_plugin.matrix import HomeserverError, Matrix
from lambda_plugin.reactions import Reactions, stop_key

BOT = "@lambda:example.org"
OWNER, GUEST = "@ann:example.org", "@guest:example.org"
ROOM = "!chat:example.org"
RUNNING = Incoming(Kind.MESSAGE, "$question", ROOM, OWNER, "hello", 1)
ROW = ChatRoomRow(ROOM, OWNER, "C1", "Chat 1", "echo", "p1", False, False, 0)


class Room:
    def __init__(self, events: dict[str, dict[str, Any]]) -> None:
        self.user_id = BOT
        self.events = events
        self.crypto = SimpleNamespace(open=self._open)
        self.cancelled = 0

    async def _open(self, room_id: str, raw: dict[str, Any]) -> Any:
        return raw.get("opened")

    opened_event = Matrix.opened_event  # the real one, over this fake's event and crypto

    async def event(self, room_id: str, event_id: str) -> dict[str, Any]:
        if event_id not in self.events:
            raise HomeserverError(404, "M_NOT_FOUND", "no such event")
        return self.events[event_id]

    def cancel(self, room_id: str) -> bool:
        self.cancelled += 1
        return True


def reactions(mx: Room, running: Incoming | None = RUNNING) -> Reactions:
    worker = SimpleNamespace(current_item=running)
    queues = SimpleNamespace(workers={ROOM: worker}, cancel=mx.cancel)
    registry = SimpleNamespace(room=lambda room_id: ROW if room_id == ROOM else None)
    return Reactions(
        settings=lambda: None, log=logging.getLogger("test.reactions"), gate=None, mx=mx,
        registry=registry, queues=queues, route=lambda incoming: None,
    )  # type: ignore[arg-type]  # fmt: skip


STREAM = {"type": "m.room.message", "sender": BOT, "content": {"body": "echo…", ANSWERING: "$question"}}
DONE = {"type": "m.room.message", "sender": BOT, "content": {"body": "echo", ANSWERS: "$question"}}
FORGED = {"type": "m.room.message", "sender": GUEST, "content": {"body": "x", ANSWERING: "$question"}}
SEALED = {"type": "m.room.encrypted", "sender": BOT, "content": {}, "opened": STREAM}
EVENTS = {"$stream": STREAM, "$done": DONE, "$forged": FORGED, "$sealed": SEALED}


EDIT = Incoming(Kind.MESSAGE, "$edit", ROOM, OWNER, "x", 2, replaces="$question")
REGENERATE = Incoming(Kind.REGENERATE, "$again", ROOM, OWNER, "", 2, regenerates="$done")


@pytest.mark.parametrize(
    ("sender", "target", "running", "stops"),
    [
        (OWNER, "$stream", RUNNING, True),  # the stream's first event
        (OWNER, "$sealed", RUNNING, True),  # the same, in an encrypted room
        (OWNER, "$question", RUNNING, True),  # the message itself
        (GUEST, "$stream", RUNNING, False),  # another member: changes nothing
        (OWNER, "$done", RUNNING, False),  # a finished answer
        (OWNER, "$forged", RUNNING, False),  # someone else's event naming it
        (OWNER, "$missing", RUNNING, False),
        (OWNER, "$stream", None, False),  # nothing running
        (OWNER, "$stream", Incoming(Kind.MESSAGE, "$other", ROOM, OWNER, "x", 2), False),
        # A re-answer: the edit (or 🔁) runs; the user sees the message and its answer.
        (OWNER, "$question", EDIT, True),  # the message edited
        (OWNER, "$done", EDIT, True),  # its finished answer, streamed into again
        (OWNER, "$stream", EDIT, True),
        (OWNER, "$done", REGENERATE, True),  # the answer the 🔁 was on
        (OWNER, "$question", REGENERATE, False),  # (the 🔁 names the answer, not the message)
        (GUEST, "$done", EDIT, False),
        (OWNER, "$forged", EDIT, False),
    ],
)
async def test_a_stop_reaction(sender: str, target: str, running: Any, stops: bool) -> None:
    mx = Room(EVENTS)
    assert await reactions(mx, running).stop(ROOM, sender, target) is stops
    assert mx.cancelled == (1 if stops else 0)


async def test_a_stop_in_a_room_the_plugin_does_not_manage_changes_nothing() -> None:
    mx = Room(EVENTS)
    assert await reactions(mx).stop("!other:example.org", OWNER, "$stream") is False


@pytest.mark.parametrize(
    ("key", "stop"),
    [("🛑", True), ("🛑\ufe0f", True), (" 🛑 ", True), ("👍", False), ("", False), (None, False), (5, False)],
)
def test_the_stop_key(key: Any, stop: bool) -> None:
    assert stop_key(key) is stop
