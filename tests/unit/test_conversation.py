"""The conversation stage with the real ledger on a real database (both engines): every
message gets one fate, written down; what a process that died left unfinished, and what is
kept for !retry, survive a restart (a new Ledger on the same database); a retried message
passes the same checks as a new one; a reset's rebuild holds every handler at the gate."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from lambda_plugin.catchup import plan_start
from lambda_plugin.conversation import Conversation
from lambda_plugin.db import ChatRoomRow, Store
from lambda_plugin.gate import StartGate
from lambda_plugin.intake import Incoming, classify
from lambda_plugin.ledger import Fate, Ledger
from lambda_plugin.matrix import HomeserverError
from lambda_plugin.reanswer import Reanswers
from lambda_plugin.startup import Startup
from lambda_plugin.usage import Quota
from tests.unit.test_config import settings as make_settings

USER = "@alice:example.org"
BOT = "@lambda:example.org"
ROOM = "!chat:example.org"
LOG = logging.getLogger("test.conversation")
TIMEOUT = 10


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
    """Answers at once, or as ``fates`` says (by event id); ``gate`` holds every answer."""

    asked: list[str] = field(default_factory=list)
    given: list[Incoming] = field(default_factory=list)  # what each answer was asked
    fates: dict[str, tuple[Fate, str]] = field(default_factory=dict)
    gate: asyncio.Event | None = None
    failing: set[str] = field(default_factory=set)
    ledger: Ledger | None = None  # told when an answer is in the room, as the real one does

    async def answer(self, room_id: str, incoming: Incoming) -> tuple[Fate, str]:
        self.asked.append(incoming.event_id)
        self.given.append(incoming)
        if self.gate is not None:
            await self.gate.wait()
        if incoming.event_id in self.failing:
            raise RuntimeError("a bug")
        fate = self.fates.get(incoming.event_id, (Fate.ANSWERED, ""))
        if fate[0] is Fate.ANSWERED and self.ledger is not None:
            # The answer's first event: the one it finished, else a new one.
            self.ledger.delivered(incoming.event_id, incoming.resume or f"$answer{incoming.event_id}")
        return fate


@dataclass
class FakeNotices:
    said: list[tuple[str, str | None]] = field(default_factory=list)

    async def say(self, room_id: str, key: str, reply_to: str | None = None, **values: object) -> str:
        self.said.append((key, reply_to))
        return "$notice"

    note = say  # a notice that does not end the message

    def said_keys(self) -> list[str]:
        return [key for key, _ in self.said]


@dataclass
class FakeRoom:
    """The room's events as ``Matrix.opened_event`` reads them (by id)."""

    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    user_id: str = BOT

    down: bool = False  # an outage: nothing can be read

    async def opened_event(self, room_id: str, event_id: str) -> dict[str, Any]:
        if self.down:
            raise HomeserverError(502, None, "bad gateway")
        if event_id not in self.events:
            raise HomeserverError(404, "M_NOT_FOUND", "no such event")
        return self.events[event_id]


class NoUsage:
    async def usage_since(self, user_id: str, first_day: str) -> tuple[int, int, int]:
        return 0, 0, 0


def message(event_id: str, body: str = "hi", ts: int = 1_000) -> Incoming:
    event = {
        "type": "m.room.message", "event_id": event_id, "sender": USER, "room_id": ROOM,
        "origin_server_ts": ts, "content": {"msgtype": "m.text", "body": body},
    }  # fmt: skip
    return classify(event, BOT)


class Env:
    """A conversation stage over a real Store; ``restart()`` is a new process's view."""

    def __init__(self, store: Store, **overrides: Any) -> None:
        self.store = store
        self.current = {"settings": make_settings(**overrides)}
        self.answerer = FakeAnswerer()
        self.notices = FakeNotices()
        self.room = FakeRoom()
        self.replayed: list[str] = []
        self.restart()

    def restart(self) -> None:
        gate = StartGate()
        gate.open()
        part = {"settings": lambda: self.current["settings"], "log": LOG}
        self.ledger = Ledger(store=self.store, bot_id=lambda: BOT, **part)
        self.answerer.ledger = self.ledger
        row = ChatRoomRow(ROOM, USER, "C1", "Chat 1", "echo", "p1", False, False, 1)

        async def replay(incoming: Incoming) -> None:
            self.replayed.append(incoming.event_id)

        reanswers = Reanswers(
            mx=self.room, ledger=self.ledger, notices=self.notices, **part  # type: ignore[arg-type]
        )
        self.stage = Conversation(
            gate=gate, ledger=self.ledger, registry=FakeRegistry({ROOM: row}),
            answerer=self.answerer, notices=self.notices, reanswers=reanswers,
            quota=Quota(store=NoUsage(), **part), replay=replay,  # type: ignore[arg-type]
            command_names=("clear",), **part,
        )  # fmt: skip

    async def state(self, event_id: str) -> str | None:
        return (await self.ledger.states_of([event_id])).get(event_id)


async def test_a_message_is_answered_once_and_a_redelivery_gets_nothing(store: Store) -> None:
    env = Env(store)
    await env.stage.message(ROOM, message("$1"), retried=False)
    await env.stage.message(ROOM, message("$1"), retried=False)
    env.restart()  # a new process: the ledger, not memory, knows it is done
    await env.stage.message(ROOM, message("$1"), retried=False)
    assert env.answerer.asked == ["$1"]
    assert await env.state("$1") == Fate.ANSWERED.value


async def test_two_deliveries_at_once_are_answered_once(store: Store) -> None:
    env = Env(store)
    env.answerer.gate = asyncio.Event()
    first = asyncio.create_task(env.stage.message(ROOM, message("$1"), retried=False))
    second = asyncio.create_task(env.stage.message(ROOM, message("$1"), retried=False))
    await asyncio.wait_for(second, TIMEOUT)  # the second sees the first's claim
    env.answerer.gate.set()
    await asyncio.wait_for(first, TIMEOUT)
    assert env.answerer.asked == ["$1"]


async def test_a_message_taken_when_the_process_died_is_answered_again_once(store: Store) -> None:
    env = Env(store)
    incoming = message("$1")
    assert await env.ledger.claim(incoming)
    await env.ledger.taken("$1")
    await env.ledger.answer_started("$1", "$partial")  # the stream's first event was sent
    env.restart()  # SIGKILL: no stop() ran, nothing was unmarked
    unfinished = await env.ledger.unfinished()
    assert [row.event_id for row in unfinished] == ["$1"]
    plan = plan_start({}, unfinished, {}, BOT, since_ms=10**15)  # however old it is
    [again] = plan.rooms[ROOM]
    assert again.event_id == "$1" and again.resume == "$partial" and again.body == "hi"
    await env.stage.message(ROOM, again, retried=False)
    await env.stage.message(ROOM, again, retried=False)
    assert env.answerer.asked == ["$1"]
    assert await env.ledger.unfinished() == []


async def test_a_stop_mid_answer_leaves_it_unfinished_not_kept(store: Store) -> None:
    env = Env(store)
    env.answerer.gate = asyncio.Event()
    call = asyncio.create_task(env.stage.message(ROOM, message("$1"), retried=False))
    await asyncio.wait_for(_until(lambda: env.answerer.asked == ["$1"]), TIMEOUT)
    call.cancel()  # the worker's stop
    await asyncio.gather(call, return_exceptions=True)
    env.stage.stopped(message("$1"))
    assert await env.state("$1") == Fate.SEEN.value
    assert await env.ledger.kept(ROOM) == []


@pytest.mark.parametrize(
    ("fate", "reason"), [(Fate.KEPT, "agent"), (Fate.KEPT, "send"), (Fate.REFUSED, "file")]
)
async def test_the_answerers_fate_is_recorded(store: Store, fate: Fate, reason: str) -> None:
    env = Env(store)
    env.answerer.fates["$1"] = (fate, reason)
    await env.stage.message(ROOM, message("$1"), retried=False)
    row = await env.ledger.table.get("$1")
    assert row is not None and (row.state, row.reason) == (fate.value, reason)
    assert (row.event is not None) == (fate is Fate.KEPT)  # only a kept one can run again


async def test_a_burst_over_the_rate_limit_keeps_every_message_across_a_restart(
    store: Store,
) -> None:
    env = Env(store, access__requests_per_minute=1)
    for n in range(1, 5):
        await env.stage.message(ROOM, message(f"${n}", ts=n), retried=False)
    assert env.answerer.asked == ["$1"]
    assert env.notices.said_keys() == ["message.too_fast"]  # told once, not once a message
    env.restart()  # a new process: the rate limiter forgets, the ledger does not
    kept = await env.ledger.kept(ROOM)
    assert [k.event_id for k in kept] == ["$2", "$3", "$4"]  # oldest first
    for incoming in kept:
        await env.stage.message(ROOM, incoming, retried=True)
    assert env.answerer.asked == ["$1", "$2"]  # the same checks as a new one: rate again
    assert [k.event_id for k in await env.ledger.kept(ROOM)] == ["$3", "$4"]


async def test_a_kept_message_is_not_run_again_without_retry(store: Store) -> None:
    env = Env(store)
    env.answerer.fates["$1"] = (Fate.KEPT, "agent")
    await env.stage.message(ROOM, message("$1"), retried=False)
    await env.stage.message(ROOM, message("$1"), retried=False)  # a redelivery
    assert env.answerer.asked == ["$1"]
    del env.answerer.fates["$1"]
    await env.stage.message(ROOM, message("$1"), retried=True)
    assert env.answerer.asked == ["$1", "$1"]
    assert await env.state("$1") == Fate.ANSWERED.value


async def test_past_max_kept_the_oldest_is_dropped_with_a_notice(store: Store) -> None:
    env = Env(store, access__max_kept_per_room=2)
    for n in range(1, 4):
        env.answerer.fates[f"${n}"] = (Fate.KEPT, "agent")
        await env.stage.message(ROOM, message(f"${n}", ts=n), retried=False)
    assert [k.event_id for k in await env.ledger.kept(ROOM)] == ["$2", "$3"]
    assert ("kept.dropped", "$1") in env.notices.said
    assert await env.state("$1") == Fate.REFUSED.value


async def test_a_retry_is_refused_when_the_user_lost_access(store: Store) -> None:
    env = Env(store)
    env.answerer.fates["$1"] = (Fate.KEPT, "agent")
    await env.stage.message(ROOM, message("$1"), retried=False)
    current = env.current
    current["settings"] = replace(current["settings"], allowed_users=make_settings(
        access__allowed_users=["@someone-else:example.org"]).allowed_users)  # fmt: skip
    await env.stage.message(ROOM, message("$1"), retried=True)
    assert env.answerer.asked == ["$1"]
    assert await env.state("$1") == Fate.LEFT.value


async def test_a_cancelled_answer_is_kept_with_a_notice(store: Store) -> None:
    env = Env(store)
    env.answerer.gate = asyncio.Event()
    call = asyncio.create_task(env.stage.message(ROOM, message("$1"), retried=False))
    await asyncio.wait_for(_until(lambda: env.answerer.asked == ["$1"]), TIMEOUT)
    call.cancel()  # !cancel
    await asyncio.gather(call, return_exceptions=True)
    await env.stage.cancelled(ROOM, message("$1"))
    assert [k.event_id for k in await env.ledger.kept(ROOM)] == ["$1"]
    assert env.notices.said_keys() == ["cancelled"]


async def test_a_failing_answer_is_kept_not_left_unfinished(store: Store) -> None:
    env = Env(store)
    env.answerer.failing.add("$1")
    with pytest.raises(RuntimeError):
        await env.stage.message(ROOM, message("$1"), retried=False)
    row = await env.ledger.table.get("$1")
    assert row is not None and (row.state, row.reason) == ("kept", "error")
    await env.stage.message(ROOM, message("$2"), retried=False)  # the room goes on
    assert env.answerer.asked == ["$1", "$2"]


@pytest.mark.parametrize(
    ("room_id", "sender", "fate"),
    [("!dm:example.org", USER, Fate.LEFT), (ROOM, "@mallory:example.org", Fate.LEFT)],
)
async def test_what_the_room_does_not_answer_is_left(
    store: Store, room_id: str, sender: str, fate: Fate
) -> None:
    env = Env(store)
    incoming = replace(message("$1"), room_id=room_id, sender=sender)
    await env.stage.message(room_id, incoming, retried=False)
    assert env.answerer.asked == []
    assert await env.state("$1") == fate.value


async def test_missed_commands_are_replayed_and_unknown_ones_answered_once(store: Store) -> None:
    env = Env(store)
    await env.stage.command(message("$clear", body="!clear"))
    await env.stage.command(message("$what", body="!what"))
    await env.stage.command(message("$what", body="!what"))
    assert env.replayed == ["$clear"]
    assert env.notices.said_keys() == ["command.unknown"]
    assert await env.state("$what") == Fate.ANSWERED.value


async def test_quota_holds_keep_parallel_answers_from_all_passing(store: Store) -> None:
    # The first passes (no other answer runs); the second sees its hold: 0 + 601 >= 500.
    env = Env(store, access__daily_tokens=500, access__answer_estimate_tokens=600)
    env.answerer.gate = asyncio.Event()
    first = asyncio.create_task(env.stage.message(ROOM, message("$1"), retried=False))
    await asyncio.wait_for(_until(lambda: env.answerer.asked == ["$1"]), TIMEOUT)
    await env.stage.message(ROOM, message("$2"), retried=False)  # while the first runs
    assert env.notices.said_keys() == ["quota.daily"]
    env.answerer.gate.set()
    await asyncio.wait_for(first, TIMEOUT)
    await env.stage.message(ROOM, message("$2"), retried=True)  # the hold is gone
    assert env.answerer.asked == ["$1", "$2"]


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.01)


@dataclass
class BlockingReconciler:
    registry: FakeRegistry
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> str:
        self.started.set()
        await self.release.wait()
        return "report"


@dataclass
class ClearingStore:
    cleared: int = 0

    async def clear_all(self) -> None:
        self.cleared += 1


async def test_reset_local_holds_the_gate_closed_until_the_rebuild_is_done() -> None:
    gate, store = StartGate(), ClearingStore()
    gate.open()
    reconciler = BlockingReconciler(FakeRegistry())
    startup = Startup(
        gate=gate, store=store, ledger=None, reconciler=reconciler, catch_up=None,
        enqueue=None, invite=None, sealed=None, background=None, settings=make_settings,
        log=LOG,
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
