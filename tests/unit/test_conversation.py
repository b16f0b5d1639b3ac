"""The conversation stage: a retried message passes the same checks as a new one (access,
rate), and a reset's rebuild holds every handler at the gate until it is done."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from lambda_plugin.conversation import Conversation
from lambda_plugin.db import ChatRoomRow
from lambda_plugin.gate import StartGate
from lambda_plugin.intake import Incoming, Kind
from lambda_plugin.queue import Outcome
from lambda_plugin.startup import Startup
from tests.unit.test_config import settings as make_settings

USER = "@alice:example.org"
ROOM = "!chat:example.org"
LOG = logging.getLogger("test.conversation")
TIMEOUT = 10


@dataclass
class FakeStore:
    handled: set[str] = field(default_factory=set)
    cleared: int = 0

    async def mark_handled(self, event_id: str, room_id: str) -> bool:
        if event_id in self.handled:
            return False
        self.handled.add(event_id)
        return True

    async def clear_all(self) -> None:
        self.cleared += 1


@dataclass
class FakeRegistry:
    rooms: dict[str, ChatRoomRow] = field(default_factory=dict)
    users: dict[str, Any] = field(default_factory=dict)
    loads: int = 0

    def room(self, room_id: str) -> ChatRoomRow | None:
        return self.rooms.get(room_id)

    async def load(self) -> None:
        self.loads += 1


@dataclass
class FakeAnswerer:
    asked: list[str] = field(default_factory=list)

    async def answer(self, room_id: str, incoming: Incoming) -> bool:
        self.asked.append(incoming.event_id)
        return True


@dataclass
class NoQuota:
    async def refusal(self, user_id: str) -> None:
        return None


@dataclass
class FakeNotices:
    said: list[str] = field(default_factory=list)

    async def say(self, room_id: str, key: str, **values: object) -> str:
        self.said.append(key)
        return "$notice"


def message(event_id: str) -> Incoming:
    return Incoming(Kind.MESSAGE, event_id=event_id, room_id=ROOM, sender=USER, body="hi")


def conversation(**overrides: Any) -> tuple[Conversation, dict[str, Any]]:
    current = {"settings": make_settings(**overrides)}
    gate = StartGate()
    gate.open()
    parts = {
        "store": FakeStore(),
        "registry": FakeRegistry({ROOM: ChatRoomRow(ROOM, USER, "C1", "Chat 1", "echo", "p1",
                                                    False, False, 1)}),
        "answerer": FakeAnswerer(),
        "notices": FakeNotices(),
        "quota": NoQuota(),
    }  # fmt: skip
    stage = Conversation(gate=gate, settings=lambda: current["settings"], log=LOG, **parts)
    return stage, {**parts, "current": current}


async def test_a_retry_is_refused_when_the_user_lost_access() -> None:
    stage, parts = conversation()
    assert await stage.message(ROOM, message("$1"), retried=False) is Outcome.ANSWERED
    current = parts["current"]
    current["settings"] = replace(current["settings"], allowed_users=make_settings(
        access__allowed_users=["@someone-else:example.org"]).allowed_users)  # fmt: skip
    assert await stage.message(ROOM, message("$1"), retried=True) is Outcome.SKIPPED
    assert parts["answerer"].asked == ["$1"]


async def test_a_retry_counts_against_the_rate_limit() -> None:
    stage, parts = conversation(access__requests_per_minute=1)
    assert await stage.message(ROOM, message("$1"), retried=False) is Outcome.ANSWERED
    assert await stage.message(ROOM, message("$1"), retried=True) is Outcome.KEEP
    assert parts["answerer"].asked == ["$1"]
    assert parts["notices"].said == ["message.too_fast"]
    # Told once a window: a second refused retry says nothing more.
    assert await stage.message(ROOM, message("$1"), retried=True) is Outcome.KEEP
    assert parts["notices"].said == ["message.too_fast"]


async def test_a_redelivery_is_answered_once_but_a_retry_again() -> None:
    stage, parts = conversation()
    assert await stage.message(ROOM, message("$1"), retried=False) is Outcome.ANSWERED
    assert await stage.message(ROOM, message("$1"), retried=False) is Outcome.SKIPPED
    assert await stage.message(ROOM, message("$1"), retried=True) is Outcome.ANSWERED
    assert parts["answerer"].asked == ["$1", "$1"]


@dataclass
class BlockingReconciler:
    registry: FakeRegistry
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> str:
        self.started.set()
        await self.release.wait()
        return "report"


async def test_reset_local_holds_the_gate_closed_until_the_rebuild_is_done() -> None:
    gate, store = StartGate(), FakeStore()
    gate.open()
    reconciler = BlockingReconciler(FakeRegistry())
    startup = Startup(
        gate=gate, store=store, reconciler=reconciler, catch_up=None, invite=None,
        sealed=None, background=None, settings=make_settings, log=LOG,
    )  # type: ignore[arg-type]  # fmt: skip
    rebuild = asyncio.create_task(startup.rebuild())
    await asyncio.wait_for(reconciler.started.wait(), TIMEOUT)
    assert not gate.is_open and store.cleared == 1
    waiting = asyncio.create_task(gate.wait())
    await asyncio.sleep(0)
    assert not waiting.done()  # an invite or !new that arrives now waits for the rebuild
    reconciler.release.set()
    assert await asyncio.wait_for(rebuild, TIMEOUT) == "report"
    assert gate.is_open and await asyncio.wait_for(waiting, TIMEOUT)
