"""createRoom made once: a request that got no answer may have made the room anyway."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from lambda_plugin import spaces as spaces_module
from lambda_plugin.marker import KIND_CHAT, KIND_SPACE, Marker
from lambda_plugin.matrix import HomeserverError
from lambda_plugin.spaces import Spaces
from tests.unit.test_config import settings

BOT = "@lambda:example.org"
USER = "@alice:example.org"
LOG = logging.getLogger("test.spaces")


class FakeRegistry:
    def __init__(self) -> None:
        self.rooms: dict[str, Any] = {"!known:example.org": object()}
        self.spaces: dict[str, str] = {"!space:example.org": USER}


class Homeserver:
    """createRoom that fails as told; a failure "made" says the room was made regardless."""

    def __init__(self, failures: list[tuple[int, bool]]) -> None:
        self.user_id = BOT
        self.failures = list(failures)
        self.creates = 0
        self.rooms: dict[str, list[dict[str, Any]]] = {
            # Rooms the bot is in that are not the one being made.
            "!known:example.org": [],
            "!forged:example.org": [],
        }

    def _state_of(self, body: dict[str, Any], sender: str) -> list[dict[str, Any]]:
        return [{**e, "sender": sender} for e in body["initial_state"]]

    async def create_room(self, body: dict[str, Any]) -> str:
        self.creates += 1
        # A room with the same marker, made by someone else: never taken for ours.
        self.rooms["!forged:example.org"] = self._state_of(body, "@mallory:example.org")
        if self.failures:
            status, made = self.failures.pop(0)
            if made:
                self.rooms[f"!made{self.creates}:example.org"] = self._state_of(body, BOT)
            raise HomeserverError(status, None, "no answer")
        room_id = f"!ok{self.creates}:example.org"
        self.rooms[room_id] = self._state_of(body, BOT)
        return room_id

    async def joined_rooms(self) -> list[str]:
        return list(self.rooms)

    async def state(self, room_id: str) -> list[dict[str, Any]]:
        return self.rooms[room_id]


def spaces_on(hs: Homeserver, monkeypatch: pytest.MonkeyPatch) -> Spaces:
    monkeypatch.setattr(spaces_module, "CREATE_LOOK_S", (0.0, 0.0, 0.0, 0.0))
    chats: Any = type("Chats", (), {"registry": FakeRegistry()})()
    current = settings()
    return Spaces(mx=hs, store=None, chats=chats, settings=lambda: current, log=LOG)  # type: ignore[arg-type]


def body(marker: Marker) -> dict[str, Any]:
    return {"name": "x", "initial_state": [marker.state_event()]}


CHAT = Marker(kind=KIND_CHAT, owner=USER, chat_id="C2", agent_id="echo", platform_chat_id="p-1")
SPACE = Marker(kind=KIND_SPACE, owner=USER)


@pytest.mark.parametrize("marker", [CHAT, SPACE])
@pytest.mark.parametrize(
    ("failures", "room_id", "creates"),
    [
        ([], "!ok1:example.org", 1),
        ([(0, True)], "!made1:example.org", 1),  # timed out, but made: found, not made again
        ([(504, True)], "!made1:example.org", 1),
        ([(503, False)], "!ok2:example.org", 2),  # not taken: tried again
        ([(503, False), (503, True)], "!made2:example.org", 2),
    ],
)
async def test_a_room_is_made_once_whatever_the_answer(
    marker: Marker, failures: list, room_id: str, creates: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    hs = Homeserver(failures)
    assert await spaces_on(hs, monkeypatch)._create_room(body(marker)) == room_id
    assert hs.creates == creates


class SlowHomeserver(Homeserver):
    """createRoom times out for the client, and the room appears only some looks later."""

    def __init__(self, looks_before_made: int) -> None:
        super().__init__([(0, False)])
        self.looks = 0
        self.due = looks_before_made

    async def joined_rooms(self) -> list[str]:
        self.looks += 1
        if self.creates and self.looks == self.due + 1:
            # The room as the bot's request made it (the forged one holds the same state).
            same = self.rooms["!forged:example.org"]
            self.rooms["!late:example.org"] = [{**e, "sender": BOT} for e in same]
        return list(self.rooms)


async def test_a_room_made_seconds_after_the_time_out_is_found_not_made_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hs = SlowHomeserver(looks_before_made=3)
    assert await spaces_on(hs, monkeypatch)._create_room(body(CHAT)) == "!late:example.org"
    assert hs.creates == 1


@pytest.mark.parametrize("failures", [[(0, False)], [(500, False)], [(502, False)]])
async def test_a_failure_that_may_have_made_the_room_is_never_tried_again(
    failures: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    hs = Homeserver(failures)
    with pytest.raises(HomeserverError):
        await spaces_on(hs, monkeypatch)._create_room(body(CHAT))
    assert hs.creates == 1


async def test_only_rooms_joined_since_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    hs = Homeserver([(0, True)])
    for i in range(50):  # DMs and other rooms of the bot's, there before
        hs.rooms[f"!dm{i}:example.org"] = []
    read: list[str] = []
    real_state = hs.state

    async def state(room_id: str) -> list[dict[str, Any]]:
        read.append(room_id)
        return await real_state(room_id)

    hs.state = state  # type: ignore[method-assign]
    assert await spaces_on(hs, monkeypatch)._create_room(body(CHAT)) == "!made1:example.org"
    assert not any(r.startswith("!dm") for r in read)


@pytest.mark.parametrize("status", [400, 403, 429])
async def test_a_refusal_is_not_tried_again(status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    hs = Homeserver([(status, False)])
    with pytest.raises(HomeserverError):
        await spaces_on(hs, monkeypatch)._create_room(body(CHAT))
    assert hs.creates == 1


async def test_three_refusals_to_take_it_give_up(monkeypatch: pytest.MonkeyPatch) -> None:
    hs = Homeserver([(503, False)] * 3)
    with pytest.raises(HomeserverError):
        await spaces_on(hs, monkeypatch)._create_room(body(CHAT))
    assert hs.creates == 3


# --- what a new room is made with --------------------------------------------------------


class Recorder(Homeserver):
    def __init__(self) -> None:
        super().__init__([])
        self.server_name = "example.org"
        self.crypto = type("Crypto", (), {"available": False})()
        self.bodies: list[dict[str, Any]] = []

    async def create_room(self, body: dict[str, Any]) -> str:
        self.bodies.append(body)
        return await super().create_room(body)

    async def displayname(self, user_id: str) -> str:
        return "Alice"

    async def default_room_version(self) -> str:
        return "12"


def state_of(body: dict[str, Any]) -> dict[str, Any]:
    return {e["type"]: e["content"] for e in body["initial_state"]}


@pytest.mark.parametrize(
    ("language", "space_topic"),
    [("en", "Your chats with AI agents"), ("ru", "Ваши чаты с ИИ-агентами")],
)
@pytest.mark.parametrize(("version", "avatar"), [(None, None), ("10", "mxc://example.org/av1")])
async def test_spaces_and_chats_are_made_closed_to_guests_with_a_topic(
    language: str, space_topic: str, version: str | None, avatar: str | None
) -> None:
    from dataclasses import replace

    from lambda_plugin.db import ChatRoomRow

    hs = Recorder()
    chats: Any = type("Chats", (), {"registry": FakeRegistry()})()
    current = replace(
        settings(language=language), room_version=version, space_avatar_url=avatar
    )
    spaces = Spaces(mx=hs, store=None, chats=chats, settings=lambda: current, log=LOG)  # type: ignore[arg-type]
    await spaces._create_space(USER)
    room = ChatRoomRow(
        room_id="", user_id=USER, chat_id="C1", name="Chat 1", agent_id="echo",
        platform_chat_id="p", archived=False, gone=False, created_at=0,
    )  # fmt: skip
    chat_body = await spaces._chat_room_body(room, "!space:example.org")
    space = state_of(hs.bodies[0])
    chat = state_of(chat_body)
    for made in (space, chat):
        assert made["m.room.guest_access"] == {"guest_access": "forbidden"}
    assert space["m.room.topic"]["topic"].startswith(space_topic)
    assert chat["m.room.topic"] == {"topic": "echo · !help"}
    assert space.get("m.room.avatar") == ({"url": avatar} if avatar else None)
    for body in (hs.bodies[0], chat_body):
        assert body.get("room_version") == version
        # v10 lists the bot in the power levels; v12 (the default here) must not.
        assert (BOT in body["power_level_content_override"]["users"]) is (version == "10")


class BrokenNeighbour(Homeserver):
    """Another room joined meanwhile, whose state can't be read, comes first in the list."""

    async def create_room(self, body: dict[str, Any]) -> str:
        self.rooms["!broken:example.org"] = []
        return await super().create_room(body)

    async def state(self, room_id: str) -> list[dict[str, Any]]:
        if room_id == "!broken:example.org":
            raise HomeserverError(403, "M_FORBIDDEN", "not yours")
        return await super().state(room_id)


async def test_a_room_that_cannot_be_read_does_not_end_the_look(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hs = BrokenNeighbour([(0, True)])
    assert await spaces_on(hs, monkeypatch)._create_room(body(CHAT)) == "!made1:example.org"
