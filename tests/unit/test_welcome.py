"""The welcome goes when a chat room's owner arrives, once per room."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from mautrix.types import Membership, MemberStateEventContent

from lambda_plugin.db import ChatRoomRow
from lambda_plugin.matrix import HomeserverError
from lambda_plugin.notices import Notices
from lambda_plugin.onboarding import Onboarding
from lambda_plugin.welcome import WELCOMED, Welcomes
from tests.unit.test_config import settings as make_settings

BOT = "@lambda:example.org"
OWNER = "@alice:example.org"
ROOM = "!chat:example.org"
LOG = logging.getLogger("test.welcome")
SETTINGS = make_settings()


class Room:
    """The bot's view of one room: what it sent, and what /messages returns."""

    def __init__(self, earlier: list[dict[str, Any]] | None = None, readable: bool = True):
        self.user_id = BOT
        self.server_name = "example.org"
        self.sent: list[dict[str, Any]] = []
        self.earlier = earlier or []
        self.readable = readable
        self.crypto = SimpleNamespace(open_all=self._open_all)

    async def _open_all(self, timelines: dict[str, list[dict[str, Any]]]) -> None:
        pass

    fail_sends = 0
    joined = True

    async def send(self, room_id: str, content: dict[str, Any], **_: Any) -> str:
        if self.fail_sends:
            self.fail_sends -= 1
            raise HomeserverError(502, None, "bad gateway")
        self.sent.append(content)
        return f"$sent{len(self.sent)}"

    async def membership(self, room_id: str, user_id: str) -> str | None:
        return "join" if self.joined else "invite"

    async def recent(self, room_id: str, limit: int = 50) -> list[dict[str, Any]]:
        if not self.readable:
            raise HomeserverError(502, None, "bad gateway")
        return self.earlier + [
            {"type": "m.room.message", "sender": BOT, "content": c} for c in self.sent
        ]


def chat(**fields: Any) -> ChatRoomRow:
    values: dict[str, Any] = dict(
        room_id=ROOM, user_id=OWNER, chat_id="C2", name="Plans", agent_id="echo",
        platform_chat_id="p", archived=False, gone=False, created_at=0,
    )  # fmt: skip
    return ChatRoomRow(**{**values, **fields})


def onboarding_on(mx: Room, room: ChatRoomRow | None) -> Onboarding:
    registry = SimpleNamespace(
        users={OWNER: object(), "@guest:example.org": object()},
        room=lambda room_id: room if room and room_id == room.room_id else None,
        spaces={},
    )
    locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
    notices = Notices(mx, lambda: SETTINGS)  # type: ignore[arg-type]
    welcomes = Welcomes(mx=mx, notices=notices, settings=lambda: SETTINGS, log=LOG)  # type: ignore[arg-type]
    return Onboarding(
        settings=lambda: SETTINGS, log=LOG, gate=None, mx=mx,
        spaces=SimpleNamespace(lock=lambda user: locks[user]),
        chats=SimpleNamespace(registry=registry), notices=notices, joins=None, welcomes=welcomes,
    )  # type: ignore[arg-type]  # fmt: skip


def welcomes_in(mx: Room) -> list[dict[str, Any]]:
    return [c for c in mx.sent if WELCOMED in c]


async def test_the_owners_join_brings_one_welcome_naming_the_room_and_agent() -> None:
    mx = Room()
    onboarding = onboarding_on(mx, chat())
    await onboarding.member_joined(ROOM, OWNER, None)
    [welcome] = welcomes_in(mx)
    assert "**Plans**" in welcome["body"] and "`echo`" in welcome["body"]
    assert welcome["msgtype"] == "m.notice" and welcome[WELCOMED] == "C2"


@pytest.mark.parametrize(
    ("user", "before", "room"),
    [
        ("@guest:example.org", None, chat()),  # another member
        ("@stranger:example.org", None, chat()),  # nobody the plugin knows
        (OWNER, MemberStateEventContent(membership=Membership.JOIN), chat()),  # a new name
        (OWNER, None, None),  # not a chat room
        (OWNER, None, chat(gone=True)),
    ],
)
async def test_other_joins_bring_no_welcome(user: str, before: Any, room: Any) -> None:
    mx = Room()
    await onboarding_on(mx, room).member_joined(ROOM, user, before)
    assert mx.sent == []


@pytest.mark.parametrize(
    "before", [None, MemberStateEventContent(membership=Membership.LEAVE)]
)
async def test_a_room_welcomed_before_gets_no_second(before: Any) -> None:
    mx = Room()
    await onboarding_on(mx, chat()).member_joined(ROOM, OWNER, None)
    # A restart later (nothing in memory): the welcome in the room is enough.
    await onboarding_on(mx, chat()).member_joined(ROOM, OWNER, before)
    assert len(welcomes_in(mx)) == 1


async def test_joins_at_once_bring_one_welcome() -> None:
    mx = Room()
    onboarding = onboarding_on(mx, chat())
    await asyncio.gather(*(onboarding.member_joined(ROOM, OWNER, None) for _ in range(5)))
    assert len(welcomes_in(mx)) == 1


async def test_an_unreadable_room_is_welcomed_anyway() -> None:
    mx = Room(readable=False)
    await onboarding_on(mx, chat()).member_joined(ROOM, OWNER, None)
    assert len(welcomes_in(mx)) == 1


async def test_someone_elses_welcome_field_is_not_the_bots() -> None:
    forged = {"type": "m.room.message", "sender": OWNER, "content": {"body": "hi", WELCOMED: "C2"}}
    mx = Room(earlier=[forged])
    await onboarding_on(mx, chat()).member_joined(ROOM, OWNER, None)
    assert len(welcomes_in(mx)) == 1


@pytest.mark.parametrize(
    "said",
    [
        {"type": "m.room.message", "sender": BOT, "content": {"body": "echo: hi"}},  # an answer
        {"type": "m.room.encrypted", "sender": BOT, "content": {"ciphertext": "…"}},  # sealed
    ],
)
async def test_a_room_the_bot_has_spoken_in_gets_no_welcome(said: dict[str, Any]) -> None:
    # A room made before this version (its welcome carries no mark), or whose keys are gone.
    mx = Room(earlier=[said])
    await onboarding_on(mx, chat()).member_joined(ROOM, OWNER, None)
    assert welcomes_in(mx) == []


async def test_a_failed_welcome_is_tried_again_on_a_later_join() -> None:
    mx = Room()
    mx.fail_sends = 1
    onboarding = onboarding_on(mx, chat())
    await onboarding.member_joined(ROOM, OWNER, None)  # never raises
    assert welcomes_in(mx) == []
    await onboarding.member_joined(ROOM, OWNER, None)
    assert len(welcomes_in(mx)) == 1


@pytest.mark.parametrize(
    ("age_s", "joined", "welcomed"),
    [(10, True, True), (10, False, False), (3600, True, False)],
)
async def test_owners_who_joined_during_a_start_are_welcomed(
    age_s: int, joined: bool, welcomed: bool
) -> None:
    import time

    mx = Room()
    mx.joined = joined
    welcomes = Welcomes(mx=mx, notices=Notices(mx, lambda: SETTINGS), settings=lambda: SETTINGS, log=LOG)  # type: ignore[arg-type]
    made = int((time.time() - age_s) * 1000)
    await welcomes.joined_meanwhile([chat(created_at=made), chat(room_id="!gone:x", gone=True)], 600)
    assert len(welcomes_in(mx)) == (1 if welcomed else 0)


async def test_a_room_name_adds_no_markup_or_link_to_the_welcome() -> None:
    mx = Room()
    hostile = "x** [Verify your account](https://evil.example/login) **y"
    await onboarding_on(mx, chat(name=hostile)).member_joined(ROOM, OWNER, None)
    [welcome] = welcomes_in(mx)
    assert "<a " not in welcome.get("formatted_body", "") and "evil.example" in welcome["body"]
    assert hostile in welcome["body"]  # the plain body shows the name as it is
