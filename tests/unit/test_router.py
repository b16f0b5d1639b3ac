"""Router: live messages into their rooms' queues, each recorded seen in the ledger. A full
queue refuses a message (not recorded) and says so once while it stays full; an unknown
command, or a replayed one (missed, decrypted late), is queued for the stage in its turn, a
known live one is left to maubot's handlers; a message that has to wait gets a read receipt,
once the gate is open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from lambda_plugin.config import Settings
from lambda_plugin.db import ChatRoomRow
from lambda_plugin.gate import StartGate
from lambda_plugin.intake import Incoming, Kind
from lambda_plugin.queue import QueueFull, RoomQueues
from lambda_plugin.routing import Queued, Router
from tests.unit.test_config import settings as make_settings
from tests.unit.test_queue import TIMEOUT, FakeStage, ended, settle

BOT = "@lambda:example.org"
USER = "@alice:example.org"
ROOM = "!a:example.org"
OTHER_ROOM = "!b:example.org"
LOG = logging.getLogger("test.router")
LIMIT = 2


@dataclass
class FakeMatrix:
    user_id: str = BOT
    receipts: list[tuple[str, str]] = field(default_factory=list)

    async def receipt(self, room_id: str, event_id: str) -> None:
        await asyncio.sleep(0)
        self.receipts.append((room_id, event_id))


@dataclass
class FakeNotices:
    mx: FakeMatrix
    said: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    async def say(
        self, room_id: str, key: str, *, reply_to: str | None = None, **values: object
    ) -> str:
        await asyncio.sleep(0)
        self.said.append((room_id, key, {"reply_to": reply_to, **values}))
        return f"$notice{len(self.said)}"

    def keys(self, key: str) -> list[tuple[str, str | None]]:
        return [(room, values["reply_to"]) for room, k, values in self.said if k == key]


@dataclass
class FakeLedger:
    """Only ``seen`` is the router's to call: sync (it writes in the background)."""

    recorded: list[Incoming] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    def seen(self, incoming: Incoming) -> None:
        self.recorded.append(incoming)

    def left(self, incoming: Incoming, reason: str) -> None:
        self.left_out.append(incoming.event_id)

    def ids(self) -> list[str]:
        return [incoming.event_id for incoming in self.recorded]


@dataclass
class FakeRegistry:
    rooms: dict[str, ChatRoomRow] = field(default_factory=dict)

    def room(self, room_id: str) -> ChatRoomRow | None:
        return self.rooms.get(room_id)


@dataclass
class Env:
    router: Router
    queues: RoomQueues
    stage: FakeStage
    gate: StartGate
    mx: FakeMatrix
    notices: FakeNotices
    ledger: FakeLedger


@pytest.fixture(scope="module")
def limited() -> Settings:
    return replace(make_settings(), max_queue_per_room=LIMIT)


def build(settings: Settings, gate: StartGate) -> Env:
    stage = FakeStage(gate=gate)
    queues = RoomQueues(stage, gate, LOG)
    mx = FakeMatrix()
    notices = FakeNotices(mx)
    ledger = FakeLedger()
    router = Router(
        settings=lambda: settings,
        log=LOG,
        queues=queues,
        ledger=ledger,  # type: ignore[arg-type]
        registry=FakeRegistry(),  # type: ignore[arg-type]
        gate=gate,
        notices=notices,  # type: ignore[arg-type]
        command_names={"help", "clear", "cancel"},
    )
    return Env(router, queues, stage, gate, mx, notices, ledger)


@pytest.fixture
async def env(limited: Settings) -> AsyncIterator[Env]:
    gate = StartGate()
    gate.open()
    made = build(limited, gate)
    yield made
    await asyncio.wait_for(made.queues.stop(), TIMEOUT)


@pytest.fixture
async def closed_env(limited: Settings) -> AsyncIterator[Env]:
    made = build(limited, StartGate())
    yield made
    await asyncio.wait_for(made.queues.stop(), TIMEOUT)


def msg(event_id: str, room_id: str = ROOM) -> Incoming:
    return Incoming(
        Kind.MESSAGE, event_id=event_id, room_id=room_id, sender=USER, body=event_id, timestamp=1
    )


def cmd(event_id: str, name: str, room_id: str = ROOM) -> Incoming:
    return Incoming(
        Kind.COMMAND, event_id=event_id, room_id=room_id, sender=USER, body=f"!{name}", command=name
    )


async def route(env: Env, *incoming: Incoming) -> None:
    for one in incoming:
        await asyncio.wait_for(env.router.route(one), TIMEOUT)


# --- a full queue ---------------------------------------------------------------------------


async def test_the_queue_takes_its_limit_then_refuses(env: Env) -> None:
    env.stage.blocked("$running")
    assert env.router.enqueue(msg("$running")) is Queued.NOW
    await env.stage.until_call("message", ROOM, "$running", False)
    assert env.router.enqueue(msg("$w1")) is Queued.WAITS
    assert env.router.enqueue(msg("$w2")) is Queued.WAITS
    assert env.queues.worker(ROOM).waiting == LIMIT
    assert env.router.enqueue(msg("$refused")) is Queued.FULL
    assert env.queues.worker(ROOM).waiting == LIMIT  # not taken
    assert env.router.enqueue(msg("$b", OTHER_ROOM)) is Queued.NOW  # rooms are independent
    assert env.ledger.ids() == ["$running", "$w1", "$w2", "$b"]  # the refused one is not seen


async def test_a_full_queue_is_told_once_while_it_stays_full(env: Env) -> None:
    release = {e: env.stage.blocked(e) for e in ("$running", "$w1", "$w2", "$w3")}
    await route(env, msg("$running"))
    await env.stage.until_call("message", ROOM, "$running", False)
    await route(env, msg("$w1"), msg("$w2"))
    assert env.notices.said == []

    await route(env, msg("$full1"), msg("$full2"), msg("$full3"))
    assert env.notices.keys("queue.full") == [(ROOM, "$full1")]
    assert env.notices.said[0][2]["max"] == LIMIT
    assert env.queues.worker(ROOM).waiting == LIMIT

    # The queue moves on: room again, so the next message is taken ...
    release["$running"].set()
    await env.stage.until_call("message", ROOM, "$w1", False)
    await route(env, msg("$w3"))
    assert env.queues.worker(ROOM).waiting == LIMIT
    assert env.notices.keys("queue.full") == [(ROOM, "$full1")]
    # ... and once full again, the next refused one is told again, once.
    await route(env, msg("$full4"), msg("$full5"))
    assert env.notices.keys("queue.full") == [(ROOM, "$full1"), (ROOM, "$full4")]

    for event in release.values():
        event.set()
    await env.stage.until_done("$w1", "$w2", "$w3")
    assert env.stage.order("message") == ["$running", "$w1", "$w2", "$w3"]
    assert not any(env.stage.has("message", ROOM, e, False) for e in ("$full1", "$full2", "$full4"))


async def test_a_full_queue_is_told_per_room(env: Env) -> None:
    for room in (ROOM, OTHER_ROOM):
        env.stage.blocked(f"$running{room}")
        await route(env, msg(f"$running{room}", room))
        await env.stage.until_call("message", room, f"$running{room}", False)
        await route(env, msg(f"$w1{room}", room), msg(f"$w2{room}", room))
    await route(env, msg("$fa1"), msg("$fb1", OTHER_ROOM), msg("$fa2"), msg("$fb2", OTHER_ROOM))
    assert env.notices.keys("queue.full") == [(ROOM, "$fa1"), (OTHER_ROOM, "$fb1")]


async def test_a_refused_message_gets_no_receipt(env: Env) -> None:
    env.stage.blocked("$running")
    await route(env, msg("$running"))
    await env.stage.until_call("message", ROOM, "$running", False)
    await route(env, msg("$w1"), msg("$w2"), msg("$refused"))
    assert (ROOM, "$refused") not in env.mx.receipts


# --- commands -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "replay", "queued"),
    [
        pytest.param("frobnicate", False, True, id="unknown-live"),
        pytest.param("frobnicate", True, True, id="unknown-replayed"),
        pytest.param("help", True, True, id="known-replayed"),
        pytest.param("help", False, False, id="known-live"),
    ],
)
async def test_which_commands_are_queued(name: str, replay: bool, queued: bool, env: Env) -> None:
    command = cmd("$cmd", name)
    assert env.router.enqueue(command, replay) is Queued.NOT
    if queued:
        items = list(env.queues.workers[ROOM].items)
        assert len(items) == 1
        assert items[0] is command  # the command item is the Incoming itself
        await env.stage.until_done("$cmd")
        assert env.stage.order("command") == ["$cmd"]
    else:
        assert ROOM not in env.queues.workers  # no worker, no item: maubot's handler's turn
        await settle()
        assert env.stage.calls == []
    assert env.stage.order("message") == []  # never handed over as a message
    assert env.ledger.ids() == []  # a command is claimed by the stage in its turn, not here
    assert env.notices.said == []  # the stage answers it (or not), the router never
    assert env.mx.receipts == []


@pytest.mark.parametrize(("name", "replay"), [("frobnicate", False), ("help", True)])
async def test_a_queued_command_waits_its_turn(name: str, replay: bool, env: Env) -> None:
    running = env.stage.blocked("$running")
    await route(env, msg("$running"))
    await env.stage.until_call("message", ROOM, "$running", False)
    assert env.router.enqueue(cmd("$cmd", name), replay) is Queued.NOT
    await route(env, msg("$after"))
    await settle()
    assert env.stage.order("command") == []
    assert len(env.queues.worker(ROOM).items) == 2
    running.set()
    await env.stage.until_done("$after")
    assert env.stage.order("done") == ["$running", "$cmd", "$after"]


async def test_known_live_commands_are_left_to_maubots_handlers(env: Env) -> None:
    for name in ("help", "clear", "cancel"):
        assert env.router.enqueue(cmd(f"${name}", name)) is Queued.NOT
    assert ROOM not in env.queues.workers  # no worker, no item: the command handler's turn
    await route(env, cmd("$help2", "help"))
    await settle()
    assert ROOM not in env.queues.workers
    assert env.stage.calls == []
    assert env.notices.said == []
    assert env.mx.receipts == []


async def test_ignored_events_are_not_queued(env: Env) -> None:
    for replay in (False, True):
        assert env.router.enqueue(Incoming(Kind.IGNORED), replay) is Queued.NOT
    assert env.queues.workers == {}
    assert env.ledger.ids() == []


async def test_a_replayed_command_is_queued_even_when_the_queue_is_full(env: Env) -> None:
    release = {e: env.stage.blocked(e) for e in ("$running", "$w1", "$w2")}
    await route(env, msg("$running"))
    await env.stage.until_call("message", ROOM, "$running", False)
    await route(env, msg("$w1"), msg("$w2"))
    assert env.router.enqueue(msg("$refused")) is Queued.FULL
    assert env.router.enqueue(cmd("$cmd", "help"), True) is Queued.NOT
    assert list(env.queues.worker(ROOM).items)[-1].event_id == "$cmd"
    for event in release.values():
        event.set()
    await env.stage.until_done("$cmd")
    assert env.stage.order("done") == ["$running", "$w1", "$w2", "$cmd"]


# --- the ledger -----------------------------------------------------------------------------


@pytest.mark.parametrize("replay", [False, True], ids=["live", "replayed"])
async def test_a_queued_message_is_recorded_seen_at_once(replay: bool, env: Env) -> None:
    one = msg("$1")
    assert env.router.enqueue(one, replay) is Queued.NOW
    assert env.ledger.recorded == [one]  # before its turn: a crash meanwhile leaves it to a start
    assert env.ledger.recorded[0] is one
    await env.stage.until_done("$1")
    assert env.ledger.ids() == ["$1"]  # once


async def test_only_queued_messages_are_recorded_seen(env: Env) -> None:
    env.stage.blocked("$running")
    await route(env, msg("$running"))
    await env.stage.until_call("message", ROOM, "$running", False)
    await route(env, msg("$w1"), msg("$w2"), msg("$refused"))
    assert env.notices.keys("queue.full") == [(ROOM, "$refused")]
    await route(env, cmd("$unknown", "frobnicate"), cmd("$help", "help"), Incoming(Kind.IGNORED))
    env.router.enqueue(cmd("$replayed", "clear"), True)
    await route(env, msg("$b", OTHER_ROOM))
    assert env.ledger.ids() == ["$running", "$w1", "$w2", "$b"]


# --- receipts -------------------------------------------------------------------------------


async def test_a_waiting_message_gets_a_receipt_when_the_gate_is_open(env: Env) -> None:
    env.stage.blocked("$first")
    await route(env, msg("$first"))  # next in turn: no receipt (the answer starts at once)
    await route(env, msg("$second"))
    assert env.mx.receipts == [(ROOM, "$second")]


async def test_a_burst_costs_a_receipt_for_the_newest_not_one_each(limited: Settings) -> None:
    """Messages arriving while a receipt is on its way: the next receipt is the newest's
    (a receipt covers what came before it); another room has its own."""
    gate = StartGate()
    gate.open()
    env = build(replace(limited, max_queue_per_room=10), gate)
    env.stage.blocked("$first")
    await route(env, msg("$first"))
    burst = [msg(f"$w{n}") for n in range(1, 6)] + [msg("$o1", OTHER_ROOM), msg("$o2", OTHER_ROOM)]
    await asyncio.wait_for(asyncio.gather(*(env.router.route(m) for m in burst)), TIMEOUT)
    assert env.mx.receipts == [(ROOM, "$w1"), (OTHER_ROOM, "$o2"), (ROOM, "$w5")]
    await route(env, msg("$w6"))  # none on its way: sent at once
    assert env.mx.receipts[-1] == (ROOM, "$w6")
    await asyncio.wait_for(env.queues.stop(), TIMEOUT)


async def test_no_receipt_while_the_gate_is_closed(closed_env: Env) -> None:
    env = closed_env
    await route(env, msg("$first"), msg("$second"))
    assert env.mx.receipts == []
    assert env.queues.worker(ROOM).waiting == 2  # both queued, nothing taken
    env.gate.open()
    await env.stage.until_done("$first", "$second")
    worker = env.queues.workers.get(ROOM)
    if worker is not None:
        await ended(worker)
    await route(env, msg("$third"))  # the queue is idle again: next in turn, no receipt
    await env.stage.until_done("$third")
    assert env.mx.receipts == []


async def test_nothing_is_refused_or_said_while_the_gate_is_closed(closed_env: Env) -> None:
    # During a start the rooms are not read yet: nothing can be decided, nothing is said
    # (not even in a room the plugin does not manage); what arrives is bounded by one sync.
    env = closed_env
    await route(env, msg("$1"), msg("$2"), msg("$3"), msg("$4"))
    assert env.queues.worker(ROOM).waiting == 4
    assert env.ledger.ids() == ["$1", "$2", "$3", "$4"]
    assert env.notices.keys("queue.full") == []
    env.gate.open()
    await env.stage.until_done("$1", "$2", "$3", "$4")
    assert env.stage.order("message") == ["$1", "$2", "$3", "$4"]


def chat_of(owner: str = USER) -> ChatRoomRow:
    return ChatRoomRow(ROOM, owner, "C1", "Chat 1", "echo", "p1", False, False, 1)


async def test_another_members_messages_take_no_place_and_get_no_word(env: Env) -> None:
    env.router.registry.rooms[ROOM] = chat_of()  # type: ignore[attr-defined]
    env.stage.blocked("$owner-1")
    member = [replace(msg(f"$m{i}"), sender="@mallory:example.org") for i in range(10)]
    await route(env, msg("$owner-1"), *member, msg("$owner-2"))
    assert env.ledger.left_out == [m.event_id for m in member]  # their fate, recorded
    assert env.queues.worker(ROOM).waiting == 1  # only the owner's next message waits
    assert env.notices.keys("queue.full") == []
    assert "$owner-2" in env.ledger.ids()


async def test_commands_take_places_and_an_unknown_one_past_the_limit_is_refused(
    env: Env,
) -> None:
    env.stage.blocked("$run")
    await route(env, msg("$run"), cmd("$u1", "what"), cmd("$u2", "what"), cmd("$u3", "what"))
    assert env.queues.worker(ROOM).places == LIMIT  # two unknown commands fill it
    assert env.notices.keys("queue.full") == [(ROOM, "$u3")]
    assert env.router.enqueue(msg("$late")) is Queued.FULL  # a message too, then


async def test_a_live_command_finds_no_place_in_a_full_queue(env: Env) -> None:
    env.queues.max_places = lambda: LIMIT
    env.stage.blocked("$run")
    await route(env, msg("$run"), msg("$a"), msg("$b"))
    with pytest.raises(QueueFull):
        async with env.queues.in_turn(ROOM, "$clear"):
            pass


async def test_another_members_flood_caught_up_after_a_start_takes_no_place() -> None:
    """Policy holds for a start's catch-up too: what the room does not answer is taken out
    of the plan (recorded as left by the start), so it fills no place of the owner's."""
    import time

    from lambda_plugin.catchup import CatchUp, plan_start
    from lambda_plugin.policy import Admission, admit

    settings = replace(make_settings(), max_queue_per_room=LIMIT)
    gate = StartGate()
    env = build(settings, gate)
    room = ChatRoomRow(ROOM, USER, "C1", "Chat 1", "echo", "p1", False, False, 0)
    env.router.registry.rooms[ROOM] = room
    now = int(time.time() * 1000)

    def raw(event_id: str, sender: str, body: str, ts: int) -> dict:
        return {"type": "m.room.message", "event_id": event_id, "sender": sender,
                "origin_server_ts": ts, "content": {"msgtype": "m.text", "body": body}}  # fmt: skip

    timeline = [raw("$owner1", USER, "hello", now - 5000)]
    timeline += [
        raw(f"$m{i}", "@mallory:example.org", "spam" if i % 2 else "!nonsense", now - 4000 + i)
        for i in range(200)
    ]
    plan = plan_start({ROOM: timeline}, [], {}, BOT, now - 600_000, {ROOM})
    dropped = plan.without(lambda i: admit(room, i.sender, settings) is Admission.IGNORE)
    assert len(dropped) == 200 and [i.event_id for i in plan.rooms[ROOM]] == ["$owner1"]
    env.stage.blocked("$owner1")  # the agent takes a while on the owner's message
    CatchUp(None, env.queues, logging.getLogger("t")).queue(plan)  # type: ignore[arg-type]
    gate.open()
    await env.stage.until_call("message", ROOM, "$owner1", False)
    assert env.router.enqueue(msg("$owner2")) is not Queued.FULL
    await asyncio.wait_for(env.queues.stop(), 5)
