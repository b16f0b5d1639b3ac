"""What a hostile review found, each pinned: encryption fails closed, a malformed command
can't block the catch-up, partial answers don't count as answers, and a message the plugin
leaves alone is recorded as handled."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from mautrix.errors import MLimitExceeded, MNotFound

from lambda_plugin.catchup import CatchUp, unanswered
from lambda_plugin.crypto import Crypto
from lambda_plugin.gate import StartGate
from lambda_plugin.intake import IGNORED, classify
from lambda_plugin.queue import RoomQueues
from tests.unit.test_queue import FakeStage

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


async def test_a_command_that_breaks_maubot_parsing_releases_its_place() -> None:
    gate = StartGate()
    queues = RoomQueues(FakeStage(), gate, LOG)  # type: ignore[arg-type]
    mx = SimpleNamespace(user_id=BOT)
    catch_up = CatchUp(mx, queues, None, lambda: [], lambda _: None, LOG)  # type: ignore[arg-type]
    # Well-formed to intake, but mautrix's reply-fallback trimming chokes on it.
    raw = command("$bad", **{"m.relates_to": {"m.in_reply_to": {"event_id": "$x"}}})
    raw["content"]["formatted_body"] = "<mx-reply>"
    raw["content"]["format"] = "org.matrix.custom.html"
    commands = catch_up.queue([(ROOM, raw)], {ROOM})
    catch_up._event = lambda incoming, raw: (_ for _ in ()).throw(TypeError("boom"))  # type: ignore[method-assign]
    with pytest.raises(TypeError):
        await catch_up.dispatch(commands)
    assert queues._reserved == {}  # the room's queue moves on past the place
    gate.stop()
    await asyncio.wait_for(queues.stop(), 10)


def test_a_partial_answer_does_not_count_as_the_answer() -> None:
    question = {
        "type": "m.room.message", "event_id": "$q", "sender": USER, "origin_server_ts": 10**13,
        "content": {"msgtype": "m.text", "body": "long question"},
    }  # fmt: skip
    partial = {
        "type": "m.room.message", "event_id": "$p", "sender": BOT, "origin_server_ts": 10**13,
        "content": {"msgtype": "m.notice", "body": "half an answer …"},
    }  # fmt: skip
    earlier = {**question, "event_id": "$earlier"}
    # The stream was cut by a stop (which unmarked the question): the partial names nothing,
    # so the question is answered again after the start.
    found = unanswered({ROOM: [earlier, question, partial]}, {ROOM}, BOT, 0, {"$earlier"})
    assert [e["event_id"] for _, e in found] == ["$q"]


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
