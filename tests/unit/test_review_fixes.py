"""What a hostile review found, each pinned: encryption fails closed, a malformed command
can't block the catch-up (nor a failing handler the other handlers), partial answers don't
count as answers, and new chat rooms are encrypted as configured."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from mautrix.errors import MLimitExceeded, MNotFound
from mautrix.types import EventType

from lambda_plugin.catchup import plan_start
from lambda_plugin.crypto import Crypto
from lambda_plugin.gate import StartGate
from lambda_plugin.intake import ANSWERING, IGNORED, Incoming, Kind, classify
from lambda_plugin.queue import RoomQueues
from lambda_plugin.replay import CommandReplay

BOT = "@lambda:example.org"
USER = "@alice:example.org"
ROOM = "!a:example.org"
LOG = logging.getLogger("test.review")


class FakeClient:
    def __init__(self, error: Exception) -> None:
        self.crypto = object()
        self.state_store = SimpleNamespace(is_encrypted=self._unknown)
        self.error = error
        self.encrypted: list[str] = []

    async def _unknown(self, room_id: str) -> None:
        return None

    async def get_state_event(self, room_id: str, event_type: Any) -> Any:
        raise self.error


async def test_an_unreadable_encryption_state_fails_closed() -> None:
    # A 429 while asking whether the room is encrypted must not send the answer in the clear.
    crypto = Crypto(FakeClient(MLimitExceeded(429, "slow down")), LOG)  # type: ignore[arg-type]
    with pytest.raises(MLimitExceeded):
        await crypto.seal(ROOM, "m.room.message", {"body": "secret answer"})


async def test_a_room_without_encryption_state_is_plain() -> None:
    crypto = Crypto(FakeClient(MNotFound(404, "no such state")), LOG)  # type: ignore[arg-type]
    assert await crypto.seal(ROOM, "m.room.message", {"body": "hi"}) == (
        "m.room.message", {"body": "hi"},
    )  # fmt: skip


def command(event_id: str, **content: Any) -> dict[str, Any]:
    return {
        "type": "m.room.message", "event_id": event_id, "sender": USER,
        "origin_server_ts": 10**13, "content": {"msgtype": "m.text", "body": "!chats", **content},
    }  # fmt: skip


@pytest.mark.parametrize("field", ["format", "formatted_body"])
def test_a_command_with_a_malformed_html_field_is_skipped(field: str) -> None:
    assert classify(command("$c", **{field: 5}), BOT) is IGNORED


class ReplayingStage:
    """The queue's stage as the plugin's: a missed command is replayed through maubot's
    handlers in its turn (``Conversation.command``); messages are only recorded."""

    def __init__(self, replay: CommandReplay) -> None:
        self.replay = replay
        self.messages: list[str] = []
        self.done = asyncio.Event()

    async def message(self, room_id: str, incoming: Incoming, retried: bool) -> None:
        self.messages.append(incoming.event_id)
        self.done.set()

    async def command(self, incoming: Incoming) -> None:
        await self.replay(incoming)

    async def cancelled(self, room_id: str, incoming: Incoming) -> None: ...

    def stopped(self, incoming: Incoming) -> None: ...

    def supersedes(self, edit: Incoming, earlier: Incoming) -> bool:
        return False

    def superseded(self, incoming: Incoming) -> None: ...


def missed(raw: dict[str, Any]) -> Incoming:
    found = classify({**raw, "room_id": ROOM}, BOT)
    assert found.kind is Kind.COMMAND  # well-formed to intake: it reaches the replay
    return found


# Well-formed to intake, but mautrix can't make a MessageEvent of them.
UNPARSABLE = [
    command("$bad", **{"m.relates_to": {"m.in_reply_to": ["$x"]}}),
    command("$bad", **{"m.relates_to": {"m.in_reply_to": "$x"}}),
    {**command("$bad"), "unsigned": 5},
]


@pytest.mark.parametrize("raw", UNPARSABLE, ids=["reply-list", "reply-text", "unsigned"])
async def test_a_command_that_breaks_maubot_parsing_is_skipped_and_its_room_moves_on(
    raw: dict[str, Any],
) -> None:
    ran: list[str] = []

    async def handler(evt: Any) -> None:
        ran.append(evt.event_id)

    client = SimpleNamespace(disable_replies=False)
    replay = CommandReplay(client, lambda: [(handler, EventType.ROOM_MESSAGE)], LOG)  # type: ignore[arg-type]
    await replay(missed(raw))  # skipped, never raised
    assert ran == []
    gate = StartGate()
    stage = ReplayingStage(replay)
    queues = RoomQueues(stage, gate, LOG)  # type: ignore[arg-type]
    after = classify({**command("$fine"), "room_id": ROOM}, BOT)
    message = Incoming(Kind.MESSAGE, "$next", ROOM, USER, "hello", 10**13)
    queues.worker(ROOM).push_start([missed(raw), after, message])  # as the catch-up queues
    gate.open()
    await asyncio.wait_for(stage.done.wait(), 10)
    assert ran == ["$fine"]  # the room's queue moved on past the broken one
    assert stage.messages == ["$next"]
    gate.stop()
    await asyncio.wait_for(queues.stop(), 10)


async def test_a_replayed_command_whose_handler_fails_does_not_stop_the_others() -> None:
    ran: list[str] = []

    async def failing(evt: Any) -> None:
        raise RuntimeError("boom")

    async def handler(evt: Any) -> None:
        ran.append(evt.event_id)

    handlers = [(failing, EventType.ROOM_MESSAGE), (handler, EventType.ROOM_MESSAGE)]
    client = SimpleNamespace(disable_replies=False)
    replay = CommandReplay(client, lambda: handlers, LOG)  # type: ignore[arg-type]
    await replay(missed(command("$c")))  # logged, not raised
    assert ran == ["$c"]


def test_a_partial_answer_does_not_count_as_the_answer() -> None:
    question = {
        "type": "m.room.message", "event_id": "$q", "sender": USER, "origin_server_ts": 10**13,
        "content": {"msgtype": "m.text", "body": "long question"},
    }  # fmt: skip
    partial = {
        "type": "m.room.message", "event_id": "$p", "sender": BOT, "origin_server_ts": 10**13,
        "content": {"msgtype": "m.notice", "body": "half an answer …", ANSWERING: "$q"},
    }  # fmt: skip
    earlier = {**question, "event_id": "$earlier"}
    # The stream was cut by a stop: the partial names the question only as being answered,
    # so it is answered again after the start, finishing the partial in place.
    plan = plan_start({ROOM: [earlier, question, partial]}, [], {"$earlier": "answered"}, BOT, 0)
    [again] = plan.rooms[ROOM]
    assert (again.event_id, again.resume) == ("$q", "$p")
    # A partial of an older version names nothing: the question is answered again, afresh.
    del partial["content"][ANSWERING]
    plan = plan_start({ROOM: [earlier, question, partial]}, [], {"$earlier": "answered"}, BOT, 0)
    [again] = plan.rooms[ROOM]
    assert (again.event_id, again.resume) == ("$q", "")


def spaces_with(encryption: str, can_encrypt: bool) -> Any:
    from dataclasses import replace

    from lambda_plugin.spaces import Spaces
    from tests.unit.test_config import settings as make_settings

    mx = SimpleNamespace(crypto=SimpleNamespace(available=can_encrypt), user_id=BOT)
    chats = SimpleNamespace(registry=None)
    current = replace(make_settings(), encryption=encryption)
    return Spaces(mx=mx, store=None, chats=chats, settings=lambda: current, log=LOG)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "can_encrypt", "encrypted"),
    [("auto", True, True), ("auto", False, False), ("never", True, False), ("always", True, True)],
)
def test_new_chat_rooms_are_encrypted_as_configured(
    mode: str, can_encrypt: bool, encrypted: bool
) -> None:
    assert spaces_with(mode, can_encrypt).encrypt_chats() is encrypted


async def test_always_without_crypto_makes_no_room_at_all() -> None:
    from lambda_plugin.spaces import EncryptionUnavailable

    spaces = spaces_with("always", False)
    with pytest.raises(EncryptionUnavailable):
        await spaces.provision(USER)  # checked before the Space: nothing is made
