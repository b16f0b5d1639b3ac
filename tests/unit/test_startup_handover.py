"""Startup.sync_done: maubot drops its first sync after a start, so the plugin hands over that
sync's messages and commands (held for the start's catch-up while it has not queued yet, else
the live way, as one sequence) and invites (after the gate opens) itself, once; every sync's
position is recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import pytest

from lambda_plugin import startup as startup_module
from lambda_plugin.config import Settings
from lambda_plugin.gate import StartGate
from lambda_plugin.intake import Incoming, Kind
from lambda_plugin.startup import Startup
from tests.unit.test_config import settings as make_settings

BOT = "@lambda:example.org"
USER = "@alice:example.org"
INVITER = "@bob:example.org"
ROOM = "!a:example.org"
OTHER_ROOM = "!b:example.org"
INVITE_ROOM = "!dm:example.org"
LOG = logging.getLogger("test.startup")
TIMEOUT = 5.0
WINDOW_S = 600.0


def now_ms() -> int:
    return int(time.time() * 1000)


def message(event_id: str, body: str | None = None, **extra: Any) -> dict[str, Any]:
    event = {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": USER,
        "origin_server_ts": now_ms(),
        "content": {"msgtype": "m.text", "body": body if body is not None else event_id},
    }
    event.update(extra)
    return event


def invite_of(inviter: str = INVITER) -> dict[str, Any]:
    member = {
        "type": "m.room.member",
        "state_key": BOT,
        "sender": inviter,
        "content": {"membership": "invite"},
    }
    return {"invite_state": {"events": [member]}}


def sync(token: str, timelines: dict[str, list[Any]], invites: dict[str, Any] | None = None):
    return {
        "next_batch": token,
        "rooms": {
            "join": {room: {"timeline": {"events": events}} for room, events in timelines.items()},
            "invite": invites or {},
        },
    }


@dataclass
class FakeCatchUp:
    mx: Any = field(default_factory=lambda: SimpleNamespace(user_id=BOT))


@dataclass
class Env:
    startup: Startup
    gate: StartGate
    catch_up: FakeCatchUp
    enqueued: list[Incoming]
    invited: list[tuple[str, str]]
    tasks: list[asyncio.Task]
    retried: list[str]

    async def background_done(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), TIMEOUT)


@pytest.fixture(scope="module")
def window() -> Settings:
    return replace(make_settings(), catch_up_s=WINDOW_S)


def started(startup: Startup) -> Startup:
    """As after the start's catch-up: maubot's first sync goes the live way."""
    startup._handed_over = None
    return startup


@pytest.fixture
async def env(window: Settings):
    gate = StartGate()
    enqueued: list[Incoming] = []
    catch_up = FakeCatchUp()
    invited: list[tuple[str, str]] = []
    tasks: list[asyncio.Task] = []
    retried: list[str] = []

    async def invite(room_id: str, inviter: str) -> None:
        await asyncio.sleep(0)
        invited.append((room_id, inviter))

    async def sealed(room_id: str, sender: str, raw: dict[str, Any]) -> None:
        """Still encrypted after the start's read: the live retry-then-notice path."""
        retried.append(raw["event_id"])

    def background(coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.create_task(coro)
        tasks.append(task)
        return task

    startup = Startup(
        settings=lambda: window,
        log=LOG,
        gate=gate,
        store=None,  # type: ignore[arg-type]
        ledger=None,  # type: ignore[arg-type]
        reconciler=SimpleNamespace(registry=None),  # type: ignore[arg-type]
        catch_up=catch_up,  # type: ignore[arg-type]
        enqueue=lambda incoming, replay: enqueued.append(incoming),
        invite=invite,
        sealed=sealed,
        background=background,
    )
    made = Env(started(startup), gate, catch_up, enqueued, invited, tasks, retried)
    yield made
    gate.stop()  # lets a task still waiting at the gate end
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT)


def first_sync() -> dict[str, Any]:
    old_ms = now_ms() - int((WINDOW_S + 120) * 1000)
    bad_ids: list[Any] = [["$x"], {"id": "$x"}, None]
    return sync(
        "s1",
        {
            ROOM: [
                message("$m1"),
                message("$old", origin_server_ts=old_ms),
                message("$old-cmd", body="!chats", origin_server_ts=old_ms),
                message("$c1", body="!clear"),
                message("$own", sender=BOT),
                message("$own-cmd", body="!help", sender=BOT),
                message("$notice", content={"msgtype": "m.notice", "body": "a bot's notice"}),
                message("$content-null", content=None),
                message("$body-number", content={"msgtype": "m.text", "body": 5}),
                message("$ts-string", origin_server_ts=str(now_ms())),
                *(message(bad) for bad in bad_ids),
                "a string",
                None,
                message("$m2"),
            ],
            OTHER_ROOM: [message("$c2", body="!help"), message("$m3")],
        },
        invites={INVITE_ROOM: invite_of(), "!garbage:example.org": {"invite_state": None}},
    )


async def test_the_first_sync_is_handed_over(env: Env) -> None:
    env.startup.sync_done(first_sync())
    # Messages and commands at once, as one sequence in each room's order, the live way in
    # (commands too: a missed command no handler of maubot's got is replayed in its turn).
    assert [(i.room_id, i.event_id, i.kind) for i in env.enqueued] == [
        (ROOM, "$m1", Kind.MESSAGE),
        (ROOM, "$c1", Kind.COMMAND),
        (ROOM, "$m2", Kind.MESSAGE),
        (OTHER_ROOM, "$c2", Kind.COMMAND),
        (OTHER_ROOM, "$m3", Kind.MESSAGE),
    ]
    assert env.enqueued[1].source is not None  # the raw event, for maubot's handlers
    # Invites only once the gate is open.
    assert len(env.tasks) == 1
    await _turns()
    assert env.invited == []
    env.gate.open()
    await env.background_done()
    assert env.invited == [(INVITE_ROOM, INVITER)]
    assert [token for _, token in env.startup.positions.seen] == ["s1"]


async def test_a_first_sync_before_the_catch_up_is_held_for_it(env: Env) -> None:
    env.startup._handed_over = {}  # the start has not queued its catch-up yet
    env.startup.sync_done(first_sync())
    assert env.enqueued == []  # merged into the start's one ordered sequence instead
    held = env.startup._handed_over
    assert held is not None and held[ROOM][0]["event_id"] == "$m1"


async def test_only_the_first_sync_is_handed_over(env: Env) -> None:
    env.gate.open()
    env.startup.sync_done(first_sync())
    await env.background_done()
    handed = (list(env.enqueued), list(env.invited))
    tasks = len(env.tasks)

    second = sync(
        "s2",
        {ROOM: [message("$later"), message("$later-cmd", body="!clear")]},
        invites={"!other-dm:example.org": invite_of("@carol:example.org")},
    )
    env.startup.sync_done(second)
    env.startup.sync_done(sync("s3", {OTHER_ROOM: [message("$later2")]}))
    await _turns()
    assert len(env.tasks) == tasks  # nothing more in the background
    await env.background_done()
    assert (env.enqueued, env.invited) == handed
    assert [token for _, token in env.startup.positions.seen] == ["s1", "s2", "s3"]


async def test_a_first_sync_with_only_messages_starts_nothing_in_the_background(
    env: Env,
) -> None:
    env.startup.sync_done(sync("s1", {ROOM: [message("$m1")]}))
    assert [i.event_id for i in env.enqueued] == ["$m1"]
    assert env.tasks == []


async def test_a_first_sync_with_only_an_invite_hands_it_over_after_the_gate(env: Env) -> None:
    env.startup.sync_done(sync("s1", {}, invites={INVITE_ROOM: invite_of()}))
    assert env.enqueued == []
    assert len(env.tasks) == 1
    await _turns()
    assert env.invited == []
    env.gate.open()
    await env.background_done()
    assert env.invited == [(INVITE_ROOM, INVITER)]


async def test_invites_are_dropped_when_the_plugin_stops_before_the_gate_opens(env: Env) -> None:
    env.startup.sync_done(sync("s1", {}, invites={INVITE_ROOM: invite_of()}))
    env.gate.stop()
    await env.background_done()
    assert env.invited == []


async def test_a_failing_invite_is_logged_and_the_others_go_on(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    async def invite(room_id: str, inviter: str) -> None:
        await asyncio.sleep(0)
        if room_id == INVITE_ROOM:
            raise RuntimeError("invite broke")
        env.invited.append((room_id, inviter))

    env.startup.invite = invite
    invites = {INVITE_ROOM: invite_of(), "!dm2:example.org": invite_of("@carol:example.org")}
    env.startup.sync_done(sync("s1", {}, invites=invites))
    env.gate.open()
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        await env.background_done()
    assert env.invited == [("!dm2:example.org", "@carol:example.org")]
    assert any(r.exc_info and INVITE_ROOM in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "data",
    [None, "sync", [], 7, {}, {"next_batch": None}, {"next_batch": 5}, {"next_batch": ""},
     {"next_batch": "s1", "rooms": None}, {"next_batch": "s1", "rooms": {"join": []}}],
)  # fmt: skip
async def test_a_malformed_first_sync_hands_over_nothing_and_never_raises(
    env: Env, data: Any
) -> None:
    env.startup.sync_done(data)
    assert env.enqueued == []
    assert env.tasks == []
    token = data.get("next_batch") if isinstance(data, dict) else None
    expected = [token] if isinstance(token, str) and token else []
    assert [t for _, t in env.startup.positions.seen] == expected
    env.startup.sync_done(sync("s2", {ROOM: [message("$m1")]}))  # not the first any more
    assert env.enqueued == []


# --- encrypted events of the first sync ------------------------------------------------------


@dataclass
class FakeCrypto:
    """Opens the encrypted events it has keys for, in place, as Crypto.open_all does."""

    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # event id -> decrypted
    opened: list[str] = field(default_factory=list)

    async def open_all(self, timelines: dict[str, list[dict[str, Any]]]) -> None:
        await asyncio.sleep(0)
        for events in timelines.values():
            for i, raw in enumerate(events):
                if raw.get("type") == "m.room.encrypted" and raw["event_id"] in self.keys:
                    self.opened.append(raw["event_id"])
                    events[i] = self.keys[raw["event_id"]]


def sealed(event_id: str, **extra: Any) -> dict[str, Any]:
    event = {
        "type": "m.room.encrypted",
        "event_id": event_id,
        "sender": USER,
        "origin_server_ts": now_ms(),
        "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "…"},
    }
    event.update(extra)
    return event


async def test_encrypted_events_of_the_first_sync_are_handed_over_once_opened(
    env: Env,
) -> None:
    old_ms = now_ms() - int((WINDOW_S + 120) * 1000)
    crypto = FakeCrypto(
        keys={
            "$e1": message("$e1"),
            "$e2": message("$e2", body="!clear"),
            "$e-old": message("$e-old", origin_server_ts=old_ms),
            "$e-own": message("$e-own", sender=BOT),
        }
    )
    env.catch_up.mx.crypto = crypto
    env.startup.sync_done(
        sync(
            "s1",
            {
                ROOM: [
                    sealed("$e1"),
                    sealed("$e2"),
                    sealed("$no-keys"),
                    sealed("$e-old", origin_server_ts=old_ms),
                    sealed("$e-own", sender=BOT),
                ]
            },
        )
    )
    assert env.enqueued == []  # not before they are opened
    assert len(env.tasks) == 1
    await env.background_done()
    assert [(i.event_id, i.kind) for i in env.enqueued] == [
        ("$e1", Kind.MESSAGE), ("$e2", Kind.COMMAND)
    ]
    assert sorted(crypto.opened) == ["$e-old", "$e-own", "$e1", "$e2"]
    # What stays shut (and is recent, and not the bot's) goes the live retry-then-notice way.
    assert env.retried == ["$no-keys"]
    tasks = len(env.tasks)
    env.startup.sync_done(sync("s2", {ROOM: [sealed("$e3")]}))  # not the first any more
    assert len(env.tasks) == tasks
    assert [i.event_id for i in env.enqueued] == ["$e1", "$e2"]


async def _turns(count: int = 20) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


# --- the start's catch-up: one ordered intake, a failed attempt leaves nothing behind ---------


class FlakyMx:
    """The catch-up's homeserver: its first /sync fails, then holds ``timeline``."""

    user_id = BOT

    def __init__(self, timeline: list[Any]) -> None:
        self.timeline = timeline
        self.syncs = 0
        self.crypto = SimpleNamespace(open_all=_open_nothing)

    async def sync(self, query: dict[str, str]) -> dict[str, Any]:
        self.syncs += 1
        if self.syncs == 1:
            raise ConnectionError("homeserver stumbled")
        return sync("s9", {ROOM: self.timeline})

    async def recent(self, room_id: str, limit: int = 50) -> list[dict[str, Any]]:
        return []

    async def account_data(self, data_type: str) -> None:
        return None


async def _open_nothing(timelines: dict[str, list[dict[str, Any]]]) -> None:
    return None


async def test_the_start_queues_missed_events_once_in_order_skipping_malformed_ones(
    window: Settings, store: Any
) -> None:
    from lambda_plugin.catchup import CatchUp
    from lambda_plugin.db import ChatRoomRow
    from lambda_plugin.ledger import Ledger
    from lambda_plugin.queue import RoomQueues
    from tests.unit.test_queue import FakeStage

    gate = StartGate()
    stage = FakeStage(gate=gate)
    queues = RoomQueues(stage, gate, LOG)
    sealed_bad = {"type": "m.room.encrypted", "event_id": ["$x"], "sender": USER,
                  "origin_server_ts": now_ms(), "content": {}}  # fmt: skip
    timeline = [
        message("$m1"), sealed_bad, message({"id": "$bad"}), message("$clear", body="!clear"),
        message("$m2"),
    ]  # fmt: skip
    mx = FlakyMx(timeline)
    ledger = Ledger(store=store, bot_id=lambda: BOT, settings=lambda: window, log=LOG)
    row = ChatRoomRow(ROOM, USER, "C1", "Chat 1", "echo", "p1", False, False, 1)
    startup = Startup(
        settings=lambda: window, log=LOG, gate=gate, store=store, ledger=ledger,
        reconciler=SimpleNamespace(registry=SimpleNamespace(rooms={ROOM: row})),  # type: ignore[arg-type]
        catch_up=CatchUp(mx, queues, LOG),  # type: ignore[arg-type]
        enqueue=lambda incoming, replay: None, invite=None, sealed=_no_seal,  # type: ignore[arg-type]
        background=asyncio.ensure_future,  # type: ignore[arg-type]
    )  # fmt: skip
    # maubot's first sync ends before the catch-up queued: it holds !clear and m2 as well.
    startup.sync_done(sync("s1", {ROOM: [message("$clear", body="!clear"), message("$m2")]}))
    try:
        invites = await asyncio.wait_for(_catch_up_fast(startup), TIMEOUT * 4)
        assert invites == [] and mx.syncs == 2
        gate.open()
        await stage.until_done("$m2")
        assert stage.sequence() == ["$m1", "$clear", "$m2"]  # each once, in timeline order
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


async def _no_seal(room_id: str, sender: str, raw: dict[str, Any]) -> None:
    return None


async def _catch_up_fast(startup: Startup) -> list[tuple[str, str]]:
    """``_catch_up_retried`` without its waits: the first attempt fails, the second runs."""
    for _ in range(2):
        try:
            return await startup._catch_up()
        except ConnectionError:
            continue
    raise AssertionError("the catch-up never succeeded")


# --- the sync position during a long start ---------------------------------------------------


class PositionStore:
    """The plugin's key-value table, as the sync position uses it."""

    def __init__(self, since: str | None) -> None:
        self.values: dict[str, str] = {"catch_up_since": since} if since else {}

    async def get_value(self, key: str) -> str | None:
        return self.values.get(key)

    async def set_value(self, key: str, value: str) -> None:
        self.values[key] = value


class LongStart:
    """A start whose reconciliation takes longer than the catch-up window: it waits for
    ``release``; the catch-up records where it read from."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.reconciling = asyncio.Event()
        self.read_from: list[str | None] = []
        self.account: dict[str, Any] = {}
        self.queued = False
        self.registry = SimpleNamespace(rooms={}, users={}, load=_nothing)
        self.user_id = BOT
        self.crypto = SimpleNamespace(available=True, open_all=_open_nothing)
        self.mx = self

    async def run(self) -> Any:  # the Reconciler
        self.reconciling.set()
        await self.release.wait()
        return SimpleNamespace(invites=0, line=lambda: "", delta=False)

    async def read(self, since: str | None, back_to_ms: int = 0) -> dict[str, Any]:  # CatchUp
        self.read_from.append(since)
        return sync("s-catch-up", {})

    async def recent_of(self, room_ids: list[str]) -> dict[str, list]:
        return {}

    def queue(self, plan: Any) -> None:
        self.queued = True

    async def set_account_data(self, data_type: str, content: dict[str, Any]) -> None:
        self.account[data_type] = content


async def _nothing(*_args: Any) -> Any:
    return None


async def _no_states(*_args: Any) -> dict:
    return {}


async def _no_rows(*_args: Any) -> list:
    return []


async def test_a_start_longer_than_the_window_stores_no_position_before_its_catch_up(
    window: Settings,
) -> None:
    long = LongStart()
    store = PositionStore(since="s-before-the-stop")
    ledger = SimpleNamespace(unfinished=_no_rows, states_of=_no_states, end=_nothing, prune=_nothing)
    startup = Startup(
        settings=lambda: window, log=LOG, gate=StartGate(), store=store, ledger=ledger,  # type: ignore[arg-type]
        reconciler=long, catch_up=long, enqueue=lambda incoming, replay: None,  # type: ignore[arg-type]
        invite=_nothing, sealed=_no_seal, background=asyncio.ensure_future,
    )  # fmt: skip
    startup.sync_done(sync("s-first", {}))  # maubot syncs as soon as it starts
    run = asyncio.ensure_future(startup.run())
    await asyncio.wait_for(long.reconciling.wait(), TIMEOUT)
    while not long.read_from:  # the catch-up's read goes on while the rooms are read
        await asyncio.sleep(0.01)
    # A window later, the start still reconciling: the minutely save (and a stop's) runs.
    startup.positions.seen = type(startup.positions.seen)(
        (at - WINDOW_S - 1, token) for at, token in startup.positions.seen
    )
    await startup.save_sync_position()
    assert store.values["catch_up_since"] == "s-before-the-stop" and long.account == {}
    assert "delta_since" not in store.values  # the delta's too: this start reconciled nothing yet
    long.release.set()
    await asyncio.wait_for(run, TIMEOUT)
    assert long.read_from == ["s-before-the-stop"] and long.queued  # nothing missed is skipped
    await startup.save_sync_position()  # once the catch-up has run, the position moves on
    assert store.values["catch_up_since"] == "s-first" == store.values["delta_since"]
    assert long.account == {"ai.lambda.matrix.catch_up": {"since": "s-first"}}


class FailingCatchUp(LongStart):
    async def read(self, since: str | None, back_to_ms: int = 0) -> dict:
        self.read_from.append(since)
        raise ConnectionError("the homeserver stumbles")


async def test_the_position_moves_on_after_a_catch_up_given_up(window, monkeypatch) -> None:
    """A catch-up given up (the homeserver stumbled through every try) lets the stored
    position move on again: frozen, the next start would read from it ever further back."""
    real_sleep = asyncio.sleep
    monkeypatch.setattr(startup_module.asyncio, "sleep", lambda s: real_sleep(0))
    catch_up = FailingCatchUp()
    catch_up.release.set()
    store = PositionStore(since="s-weeks-old")
    ledger = SimpleNamespace(unfinished=_no_rows, states_of=_no_states, end=_nothing, prune=_nothing)
    startup = Startup(
        settings=lambda: window, log=LOG, gate=StartGate(), store=store, ledger=ledger,
        reconciler=catch_up, catch_up=catch_up, enqueue=lambda incoming, replay: None,
        invite=_nothing, sealed=_no_seal, background=asyncio.ensure_future,
    )  # type: ignore[arg-type]  # fmt: skip
    await asyncio.wait_for(startup.run(), TIMEOUT)
    assert len(catch_up.read_from) == 4  # given up; the gate is open, the plugin runs on
    startup.sync_done(sync("s-today", {}))
    startup.positions.seen = type(startup.positions.seen)(
        (at - WINDOW_S - 1, token) for at, token in startup.positions.seen
    )
    await startup.save_sync_position()
    assert store.values["catch_up_since"] == "s-today"
