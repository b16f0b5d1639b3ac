"""A restart with the database intact reads only the rooms changed since it stopped, then
verifies every room in the background; without a usable position it reads everything."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from lambda_plugin.catchup import DELTA_TOKEN_KEY, catch_up_filter
from lambda_plugin.gate import StartGate
from lambda_plugin.matrix import HomeserverError
from lambda_plugin.reconcile import Report
from lambda_plugin.reconcile.delta import changed_rooms, changes_since, delta_filter, reread_changed
from lambda_plugin.roomstate import STATE_TYPES
from lambda_plugin.startup import VERIFY_TRIES, Startup
from tests.unit.test_config import settings as make_settings
from tests.unit.test_startup_handover import LongStart

LOG = logging.getLogger("test.delta")
TIMEOUT = 10
STATE = {"events": [{"type": "m.room.name", "state_key": "", "content": {"name": "x"}}]}


@pytest.mark.parametrize(
    ("sync", "changed"),
    [
        ({"rooms": {"join": {"!a:x": {"state": STATE}, "!b:x": {"timeline": STATE}}}}, ["!a:x", "!b:x"]),
        ({"rooms": {"join": {"!a:x": {"timeline": {"events": []}, "state": {"events": []}}}}}, []),
        ({"rooms": {"leave": {"!gone:x": {}}, "join": {"!a:x": {}}}}, ["!gone:x"]),
        ({"rooms": {"join": {"!a:x": None, "!b:x": {"state": "x"}, "!c:x": {"state": {"events": 5}}}}}, []),
        ({"rooms": {"join": ["!a:x"], "leave": "!b:x"}}, []),
        ({"rooms": None}, []),
        ([], []),
        (None, []),
    ],
)  # fmt: skip
def test_the_changed_rooms_of_a_filtered_sync(sync: Any, changed: list[str]) -> None:
    assert changed_rooms(sync) == changed


def test_the_filter_asks_for_state_changes_only() -> None:
    room = json.loads(delta_filter())["room"]
    assert room["timeline"]["types"] == STATE_TYPES == room["state"]["types"]
    assert room["include_leave"] is True and room["ephemeral"] == {"not_types": ["*"]}
    assert delta_filter() != delta_filter()  # never a cached answer of the last start


@pytest.mark.parametrize("one_off", [delta_filter, catch_up_filter])
def test_a_one_off_read_lazy_loads_members_and_asks_for_none(one_off: Any) -> None:
    """Synapse skips its per-room partial-state lookup only on a lazy-loading sync; the
    device's lazy-member cache, which maubot's own sync uses, is left alone."""
    state = json.loads(one_off())["room"]["state"]
    assert state["lazy_load_members"] is True
    assert state["include_redundant_members"] is True  # maubot's sync keeps its members
    assert "m.room.member" not in state["types"]


async def delta_start(mx: Any, since: str, reread: Any, log: Any, most: int = 200) -> Report | None:
    """The delta's two steps, as a start runs them."""
    changed = await changes_since(mx, since, log)
    return await reread_changed(changed, reread, log, most) if changed is not None else None


class DeltaMatrix:
    def __init__(self, answer: dict | HomeserverError) -> None:
        self.answer = answer
        self.requests = 0
        self.queries: list[dict[str, str]] = []

    async def sync(self, query: dict[str, str], timeout_s: float = 120) -> dict:
        self.requests += 1
        self.queries.append(query)
        if isinstance(self.answer, HomeserverError):
            raise self.answer
        return self.answer


CHANGED = {"rooms": {"join": {"!a:x": {"state": STATE}}, "leave": {"!b:x": {}}}}


async def test_only_the_changed_rooms_are_read_again() -> None:
    mx, read = DeltaMatrix(CHANGED), []

    async def reread(room_id: str) -> None:
        read.append(room_id)

    report = await delta_start(mx, "s-stop", reread, LOG)  # type: ignore[arg-type]
    assert read == ["!a:x", "!b:x"] and mx.queries[0]["since"] == "s-stop"
    assert report is not None and (report.delta, report.changed_rooms, mx.requests) == (True, 2, 1)


@pytest.mark.parametrize(
    ("answer", "fails"),
    [
        (HomeserverError(400, "M_UNKNOWN", "bad since"), False),  # refused: read everything
        (HomeserverError(404, None, "no such token"), False),
        (CHANGED, True),  # a changed room that can't be read now: read everything
    ],
)
async def test_an_unusable_delta_means_every_room_is_read(answer: Any, fails: bool) -> None:
    async def reread(room_id: str) -> None:
        if fails:
            raise HomeserverError(403, "M_FORBIDDEN", "not now")

    assert await delta_start(DeltaMatrix(answer), "s", reread, LOG) is None  # type: ignore[arg-type]


async def test_a_changed_room_that_answers_too_slowly_is_left_to_the_verification() -> None:
    """A room still being joined over federation answers /state minutes later: the start
    answers without it (the verification after the gate reads it), the others are read."""
    read: list[str] = []
    endless = asyncio.Event()

    async def reread(room_id: str) -> None:
        if room_id == "!slow:hs":
            await endless.wait()  # never set
        read.append(room_id)

    started = asyncio.get_running_loop().time()
    report = await reread_changed(["!fast:hs", "!slow:hs"], reread, LOG, read_s=0.2)
    assert report is not None and report.delta and report.changed_rooms == 2
    assert read == ["!fast:hs"]
    assert asyncio.get_running_loop().time() - started < 5  # bounded, not the room's wait


@pytest.mark.parametrize("status", [0, 502])
async def test_an_outage_during_the_delta_is_raised_for_the_start_to_try_again(status: int) -> None:
    async def reread(room_id: str) -> None:
        raise AssertionError("nothing to read")

    with pytest.raises(HomeserverError):
        await delta_start(DeltaMatrix(HomeserverError(status, None, "down")), "s", reread, LOG)  # type: ignore[arg-type]


class Reconciling(LongStart):
    """A reconciler whose full runs are recorded (gentle or not); its rooms changed: one."""

    def __init__(self, repairs: int = 0) -> None:
        super().__init__()
        self.release.set()
        self.registry = SimpleNamespace(
            rooms={"!a:x": SimpleNamespace(room_id="!a:x", gone=False, archived=False)}, users={"@ann:x": object()},
            load=self._load,
        )
        self.runs: list[bool] = []
        self.reread_rooms: list[str] = []
        self.answer = CHANGED
        self.requests = 0
        self.repairs = repairs
        self.last_report: Report | None = None

    async def _load(self) -> None:
        pass

    async def run(self, dry_run: bool = False, gentle: bool = False) -> Report:  # type: ignore[override]
        self.runs.append(gentle)
        return Report(repaired_chat_rows=self.repairs if gentle else 0)

    async def reread(self, room_id: str) -> None:
        self.reread_rooms.append(room_id)

    async def sync(self, query: dict[str, str], timeout_s: float = 120) -> dict:
        return self.answer

    async def account_data(self, data_type: str) -> dict | None:  # no position there either
        return None


class Values:
    def __init__(self, **values: str) -> None:
        self.values = values

    async def get_value(self, key: str) -> str | None:
        return self.values.get(key)


async def _nothing(*_args: Any) -> Any:
    return []


def startup_of(reconciler: Reconciling, store: Values, delta: bool = True) -> Startup:
    settings = replace(make_settings(), delta_start=delta)
    ledger = SimpleNamespace(unfinished=_nothing, states_of=_states, end=_nothing, prune=_nothing)
    return Startup(
        settings=lambda: settings, log=LOG, gate=StartGate(), store=store, ledger=ledger,
        reconciler=reconciler, catch_up=reconciler, enqueue=lambda incoming, replay: None,
        invite=_nothing, sealed=_nothing, background=asyncio.ensure_future,
    )  # type: ignore[arg-type]  # fmt: skip


async def _states(*_args: Any) -> dict:
    return {}


@pytest.mark.parametrize("repairs", [0, 2])
async def test_a_restart_reads_the_changed_rooms_then_verifies_all_in_the_background(
    repairs: int, caplog: pytest.LogCaptureFixture
) -> None:
    reconciler = Reconciling(repairs)
    startup = startup_of(reconciler, Values(**{DELTA_TOKEN_KEY: "s-stop"}))
    await asyncio.wait_for(startup.run(), TIMEOUT)
    assert startup.gate.is_open and reconciler.reread_rooms == ["!a:x", "!b:x"]
    assert startup.verification is not None
    verified = await asyncio.wait_for(startup.verification, TIMEOUT)  # type: ignore[arg-type]
    assert reconciler.runs == [True]  # one full run, gentle, after the gate opened
    assert verified is not None and verified.repairs() == repairs
    assert ("repaired" in caplog.text) is bool(repairs)


@pytest.mark.parametrize(
    ("values", "delta", "users"),
    [
        ({}, True, True),  # the database lost its position (or never had one)
        ({DELTA_TOKEN_KEY: "s-stop"}, False, True),  # the operator turned it off
        ({DELTA_TOKEN_KEY: "s-stop"}, True, False),  # a database without its rows: rebuilt
    ],
)
async def test_without_a_usable_position_every_room_is_read_before_the_gate(
    values: dict[str, str], delta: bool, users: bool
) -> None:
    reconciler = Reconciling()
    if not users:
        reconciler.registry.rooms = {}
    startup = startup_of(reconciler, Values(**values), delta)
    await asyncio.wait_for(startup.run(), TIMEOUT)
    assert reconciler.runs == [False] and reconciler.reread_rooms == []
    assert startup.verification is None


async def test_more_changed_rooms_than_one_batch_are_read_all_at_once() -> None:
    async def reread(room_id: str) -> None:
        raise AssertionError("read each: more costly than the full read")

    assert await delta_start(DeltaMatrix(CHANGED), "s", reread, LOG, most=1) is None  # type: ignore[arg-type]


class FlakyReconciling(Reconciling):
    """Its first verification fails (the homeserver stumbles); the next one runs."""

    async def run(self, dry_run: bool = False, gentle: bool = False) -> Report:  # type: ignore[override]
        self.runs.append(gentle)
        if len(self.runs) == 1:
            raise HomeserverError(0, None, "unreachable")
        return Report()


async def test_a_failed_verification_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    real_sleep = asyncio.sleep
    monkeypatch.setattr("lambda_plugin.startup.asyncio.sleep", lambda s: real_sleep(0))
    reconciler = FlakyReconciling()
    startup = startup_of(reconciler, Values(**{DELTA_TOKEN_KEY: "s-stop"}))
    assert await asyncio.wait_for(startup.verify(), TIMEOUT) is not None
    assert reconciler.runs == [True, True]


async def test_a_reset_during_the_verification_keeps_answering_until_it_can_start() -> None:
    """The reset waits for the verification's lock with the gate open: users are answered
    meanwhile; only once it holds the lock is the gate closed for the rebuild."""
    reconciler = Reconciling()
    startup = startup_of(reconciler, Values())
    startup.gate.open()
    cleared = asyncio.Event()

    async def clear_all() -> None:
        assert not startup.gate.is_open  # closed only now
        cleared.set()

    startup.store.clear_all = clear_all  # type: ignore[attr-defined]
    async with startup._lock:  # the verification holds it
        rebuild = asyncio.ensure_future(startup.rebuild())
        for _ in range(10):  # the reset runs until it waits for the lock
            await asyncio.sleep(0)
        assert startup.gate.is_open and not cleared.is_set()
    await asyncio.wait_for(rebuild, TIMEOUT)
    assert cleared.is_set() and startup.gate.is_open


class Overlapping(Reconciling):
    """Its registry loads only once the delta's /sync was asked: a start that asked in turn
    would never finish."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()

    async def _load(self) -> None:
        await self.asked.wait()

    async def sync(self, query: dict[str, str], timeout_s: float = 120) -> dict:
        self.asked.set()
        return self.answer


async def test_the_changes_are_asked_for_while_the_registry_loads() -> None:
    reconciler = Overlapping()
    startup = startup_of(reconciler, Values(**{DELTA_TOKEN_KEY: "s-stop"}))
    await asyncio.wait_for(startup.run(), TIMEOUT)
    assert reconciler.reread_rooms == ["!a:x", "!b:x"]


class BrokenReconciling(Reconciling):
    async def run(self, dry_run: bool = False, gentle: bool = False) -> Report:  # type: ignore[override]
        self.runs.append(gentle)
        raise ValueError("a failure that stays")


async def test_a_verification_that_keeps_failing_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not every room read again and again (holding the lock a reset waits for): a few tries."""
    real_sleep = asyncio.sleep
    monkeypatch.setattr("lambda_plugin.startup.asyncio.sleep", lambda s: real_sleep(0))
    reconciler = BrokenReconciling()
    startup = startup_of(reconciler, Values(**{DELTA_TOKEN_KEY: "s-stop"}))
    assert await asyncio.wait_for(startup.verify(), TIMEOUT) is None
    assert reconciler.runs == [True] * VERIFY_TRIES
