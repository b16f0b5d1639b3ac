"""The room queue: one worker per room, in order (messages, command slots, command items and
retries as one sequence), !cancel, caught-up items at the head, RoomQueues.retry, stop, and
a failing stage that is survived.

The stage is a fake that records what it is asked and can be told, per event, to block until
released or to raise. Waits are on conditions (never on time), each bounded by
asyncio.wait_for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from lambda_plugin.gate import StartGate
from lambda_plugin.intake import Incoming, Kind
from lambda_plugin.queue import RoomQueues, RoomWorker

ROOM = "!a:example.org"
OTHER_ROOM = "!b:example.org"
USER = "@alice:example.org"
TIMEOUT = 5.0
LOG = logging.getLogger("test.queue")


def msg(event_id: str, room_id: str = ROOM, body: str = "") -> Incoming:
    return Incoming(
        Kind.MESSAGE, event_id=event_id, room_id=room_id, sender=USER, body=body or event_id
    )


def command(event_id: str, name: str = "frobnicate", room_id: str = ROOM) -> Incoming:
    """A command item: one that reached no handler of maubot's (unknown, missed, replayed)."""
    return Incoming(
        Kind.COMMAND, event_id=event_id, room_id=room_id, sender=USER, body=f"!{name}", command=name
    )


@dataclass
class Step:
    """What the fake stage does with one message or command item."""

    block: asyncio.Event | None = None  # waits for it before returning
    error: Exception | None = None  # raised (after the block, if any)
    wait_gate: bool = False  # waits for the start gate first, as the real stage does


@dataclass
class FakeStage:
    """A Stage that records its calls as tuples in ``calls``:

    ("message", room, event_id, retried) when a message is handed over,
    ("command", room, event_id) when a command item is,
    ("done", event_id) when either returns; when it is cancelled, ("cleaning", event_id) as
    its clean-up starts and ("aborted", event_id) once that has ended;
    ("cancelled", room, event_id) and ("stopped", event_id) for those calls of the stage,
    ("control", name) when a command's control starts.
    """

    gate: StartGate | None = None
    steps: dict[str, Step] = field(default_factory=dict)
    calls: list[tuple] = field(default_factory=list)
    active: dict[str, int] = field(default_factory=dict)  # room -> running message calls
    most_active: dict[str, int] = field(default_factory=dict)
    cleanup_yields: int = 0  # loop turns a cancelled call takes to clean up
    cancelled_error: Exception | None = None  # raised by ``cancelled``

    def __post_init__(self) -> None:
        self._changed = asyncio.Event()

    def record(self, *call: Any) -> None:
        self.calls.append(call)
        self._changed.set()

    def step(self, event_id: str, **kwargs: Any) -> Step:
        found = self.steps[event_id] = Step(**kwargs)
        return found

    def blocked(self, event_id: str, **kwargs: Any) -> asyncio.Event:
        """Makes the message (or command item) block until the returned event is set."""
        release = asyncio.Event()
        self.step(event_id, block=release, **kwargs)
        return release

    async def message(self, room_id: str, incoming: Incoming, retried: bool) -> None:
        self.record("message", room_id, incoming.event_id, retried)
        self.active[room_id] = self.active.get(room_id, 0) + 1
        self.most_active[room_id] = max(self.most_active.get(room_id, 0), self.active[room_id])
        try:
            await self._act(incoming)
        finally:
            self.active[room_id] -= 1

    async def command(self, incoming: Incoming) -> None:
        self.record("command", incoming.room_id, incoming.event_id)
        await self._act(incoming)

    async def _act(self, incoming: Incoming) -> None:
        step = self.steps.get(incoming.event_id, Step())
        try:
            if step.wait_gate:
                assert self.gate is not None
                await self.gate.wait()
            if step.block is not None:
                await step.block.wait()
            if step.error is not None:
                raise step.error
            self.record("done", incoming.event_id)
        except asyncio.CancelledError:
            self.record("cleaning", incoming.event_id)
            for _ in range(self.cleanup_yields):
                await asyncio.sleep(0)
            self.record("aborted", incoming.event_id)
            raise

    async def cancelled(self, room_id: str, incoming: Incoming) -> None:
        self.record("cancelled", room_id, incoming.event_id)
        if self.cancelled_error is not None:
            raise self.cancelled_error

    def stopped(self, incoming: Incoming) -> None:
        self.record("stopped", incoming.event_id)

    def supersedes(self, edit: Incoming, earlier: Incoming) -> bool:
        return (
            earlier.sender == edit.sender and earlier.event_id != edit.event_id
            and earlier.turn == edit.replaces
        )  # fmt: skip

    def superseded(self, incoming: Incoming) -> None:
        self.record("superseded", incoming.event_id)

    def control(
        self, name: str, block: asyncio.Event | None = None, error: Exception | None = None
    ) -> Callable[[], Awaitable[None]]:
        """What a command runs in its turn: records its name, then waits for ``block`` and
        raises ``error``, if given."""

        async def run() -> None:
            self.record("control", name)
            if block is not None:
                await block.wait()
            if error is not None:
                raise error

        return run

    # --- reading the record ---

    def order(self, kind: str = "done") -> list[str]:
        """Event ids (or control names) in the order of the calls of ``kind``."""
        at = 2 if kind in ("message", "command", "cancelled") else 1
        return [call[at] for call in self.calls if call[0] == kind]

    def sequence(self) -> list[str]:
        """Finished messages and command items and started controls, as one sequence."""
        return [call[1] for call in self.calls if call[0] in ("done", "control")]

    def started(self) -> list[tuple[str, str]]:
        """What the queue began, in order: ("message" | "retry" | "command", event_id) or
        ("control", name)."""
        found = []
        for call in self.calls:
            if call[0] == "message":
                found.append(("retry" if call[3] else "message", call[2]))
            elif call[0] == "command":
                found.append(("command", call[2]))
            elif call[0] == "control":
                found.append(("control", call[1]))
        return found

    def has(self, *call: Any) -> bool:
        return call in self.calls

    async def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async def wait() -> None:
            while not predicate():  # checked and cleared with no await between: no lost wake-up
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def until_call(self, *call: Any) -> None:
        await self.until(lambda: call in self.calls)

    async def until_done(self, *event_ids: str) -> None:
        await self.until(lambda: all(("done", e) in self.calls for e in event_ids))


async def settle(turns: int = 50) -> None:
    """Lets every ready task run (loop turns, no time passes): for "nothing else happened"."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def ended(worker: RoomWorker) -> None:
    await asyncio.wait_for(asyncio.shield(worker.task), TIMEOUT)


async def fill(queues: RoomQueues, control: Callable[[], Awaitable[None]] | None) -> None:
    """A live command's slot, as ``@in_turn`` takes it: at once, filled with its control."""
    async with queues.in_turn(ROOM) as slot:
        slot.set_result(control)


@pytest.fixture
def gate() -> StartGate:
    opened = StartGate()
    opened.open()
    return opened


@pytest.fixture
def stage(gate: StartGate) -> FakeStage:
    return FakeStage(gate=gate)


@pytest.fixture
async def queues(stage: FakeStage, gate: StartGate):
    made = RoomQueues(stage, gate, LOG)
    yield made
    await asyncio.wait_for(made.stop(), TIMEOUT)


# --- order ----------------------------------------------------------------------------------


async def test_one_room_in_order_one_at_a_time(queues: RoomQueues, stage: FakeStage) -> None:
    first = stage.blocked("$1")
    worker = queues.worker(ROOM)
    for event_id in ("$1", "$2", "$3"):
        worker.push(msg(event_id))
    await stage.until_call("message", ROOM, "$1", False)
    await settle()
    assert stage.order("message") == ["$1"]  # the others wait their turn
    assert worker.busy
    assert worker.waiting == 2
    assert worker.current_item == msg("$1")
    assert queues.busy_rooms() == 1
    first.set()
    await stage.until_done("$1", "$2", "$3")
    assert stage.order("message") == ["$1", "$2", "$3"]
    assert stage.order("done") == ["$1", "$2", "$3"]
    assert stage.most_active[ROOM] == 1
    await ended(worker)
    assert not worker.busy
    assert queues.busy_rooms() == 0


async def test_messages_commands_and_retries_run_in_the_order_queued(
    queues: RoomQueues, stage: FakeStage
) -> None:
    first = stage.blocked("$1")
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    await fill(queues, stage.control("clear"))  # a live command's slot
    worker.push(msg("$2"))
    worker.push(command("$unknown"))  # a command item
    queues.retry(ROOM, [msg("$k1"), msg("$k2")])  # !retry: kept ones, oldest first
    await fill(queues, stage.control("agent"))
    worker.push(msg("$3"))
    worker.push(command("$missed", "help"))
    first.set()
    await stage.until_done("$3", "$missed")
    assert stage.started() == [
        ("message", "$1"),
        ("control", "clear"),
        ("message", "$2"),
        ("command", "$unknown"),
        ("retry", "$k1"),
        ("retry", "$k2"),
        ("control", "agent"),
        ("message", "$3"),
        ("command", "$missed"),
    ]
    assert stage.most_active[ROOM] == 1
    await ended(worker)


@pytest.mark.parametrize("kind", ["message", "retry", "command", "control"])
async def test_nothing_behind_an_item_starts_before_it_ends(
    kind: str, queues: RoomQueues, stage: FakeStage
) -> None:
    release = asyncio.Event()
    if kind == "control":
        await fill(queues, stage.control("$first", block=release))
    else:
        stage.step("$first", block=release)
        if kind == "message":
            queues.worker(ROOM).push(msg("$first"))
        elif kind == "retry":
            queues.retry(ROOM, [msg("$first")])
        else:
            queues.worker(ROOM).push(command("$first"))
    worker = queues.workers[ROOM]
    worker.push(msg("$next"))
    worker.push(command("$next-command"))
    await stage.until(lambda: stage.started() == [(kind, "$first")])
    await settle()
    assert stage.started() == [(kind, "$first")]  # all else waits for it
    release.set()
    await stage.until_done("$next", "$next-command")
    assert stage.started() == [(kind, "$first"), ("message", "$next"), ("command", "$next-command")]


async def test_rooms_are_independent(queues: RoomQueues, stage: FakeStage) -> None:
    blocked = stage.blocked("$a1")
    queues.worker(ROOM).push(msg("$a1"))
    queues.worker(ROOM).push(msg("$a2"))
    await stage.until_call("message", ROOM, "$a1", False)
    queues.worker(OTHER_ROOM).push(msg("$b1", OTHER_ROOM))
    queues.worker(OTHER_ROOM).push(command("$b2", room_id=OTHER_ROOM))
    await stage.until_done("$b1", "$b2")  # while room A is still held up
    assert not stage.has("done", "$a1")
    assert not stage.has("message", ROOM, "$a2", False)
    assert queues.busy_rooms() == 1
    blocked.set()
    await stage.until_done("$a1", "$a2")
    assert stage.order("done") == ["$b1", "$b2", "$a1", "$a2"]


async def test_both_rooms_run_at_the_same_time(queues: RoomQueues, stage: FakeStage) -> None:
    a, b = stage.blocked("$a"), stage.blocked("$b")
    queues.worker(ROOM).push(msg("$a"))
    queues.worker(OTHER_ROOM).push(msg("$b", OTHER_ROOM))
    await stage.until(lambda: stage.active.get(ROOM) == 1 and stage.active.get(OTHER_ROOM) == 1)
    assert queues.busy_rooms() == 2
    a.set()
    b.set()
    await stage.until_done("$a", "$b")


async def _queue_message(queues: RoomQueues) -> None:
    queues.worker(ROOM).push(msg("$m"))


async def _queue_retry(queues: RoomQueues) -> None:
    queues.retry(ROOM, [msg("$k")])


async def _queue_slot(queues: RoomQueues) -> None:
    await fill(queues, None)


async def _queue_command(queues: RoomQueues) -> None:
    queues.worker(ROOM).push(command("$c"))


@pytest.mark.parametrize(
    ("queue_one", "counted"),
    [
        pytest.param(_queue_message, 1, id="message"),
        pytest.param(_queue_retry, 1, id="retry"),
        pytest.param(_queue_slot, 0, id="command-slot"),
        pytest.param(
            _queue_command, 0, id="command-item",
        ),
    ],
)  # fmt: skip
async def test_waiting_counts_messages_and_retries_only(
    queue_one: Callable[[RoomQueues], Awaitable[None]],
    counted: int,
    queues: RoomQueues,
    stage: FakeStage,
) -> None:
    running = stage.blocked("$running")
    worker = queues.worker(ROOM)
    worker.push(msg("$running"))
    await stage.until_call("message", ROOM, "$running", False)
    assert worker.waiting == 0  # the one under way is not waiting
    await queue_one(queues)
    assert len(worker.items) == 1
    assert worker.waiting == counted
    assert worker.busy
    running.set()


# --- command slots and command items ---------------------------------------------------------


async def test_unfilled_slot_holds_the_queue_until_filled(
    queues: RoomQueues, stage: FakeStage
) -> None:
    command_checked = asyncio.Event()

    async def live_command() -> None:
        async with queues.in_turn(ROOM) as slot:  # its place is taken at once
            await command_checked.wait()  # checking arguments, talking to the homeserver…
            slot.set_result(stage.control("cmd"))

    task = asyncio.create_task(live_command())
    await settle()
    queues.worker(ROOM).push(msg("$after"))
    await settle()
    assert not stage.has("message", ROOM, "$after", False)  # waits behind the command
    command_checked.set()
    await asyncio.wait_for(task, TIMEOUT)
    await stage.until_done("$after")
    assert stage.sequence() == ["cmd", "$after"]


async def test_empty_slot_is_skipped(queues: RoomQueues, stage: FakeStage) -> None:
    first = stage.blocked("$1")
    queues.worker(ROOM).push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    await fill(queues, None)  # the command had nothing to do in turn
    async with queues.in_turn(ROOM):
        pass  # left empty: the context fills it with None
    queues.worker(ROOM).push(msg("$2"))
    first.set()
    await stage.until_done("$2")
    assert stage.sequence() == ["$1", "$2"]


async def test_slot_of_a_failing_command_is_let_go(queues: RoomQueues, stage: FakeStage) -> None:
    with pytest.raises(ValueError):
        async with queues.in_turn(ROOM):
            raise ValueError("bad argument")
    queues.worker(ROOM).push(msg("$2"))
    await stage.until_done("$2")


async def test_a_command_item_reaches_stage_command_in_its_place(
    queues: RoomQueues, stage: FakeStage
) -> None:
    first = stage.blocked("$1")
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    missed = command("$cmd", "help")
    worker.push(missed)
    worker.push(msg("$2"))
    await settle()
    assert not stage.has("command", ROOM, "$cmd")  # waits its turn
    first.set()
    await stage.until_done("$2")
    assert stage.order("command") == ["$cmd"]
    assert stage.order("message") == ["$1", "$2"]  # never handed over as a message
    assert stage.order("done") == ["$1", "$cmd", "$2"]
    await ended(worker)


# --- cancel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("retried", [False, True], ids=["message", "retry"])
async def test_cancel_stops_the_running_call(
    retried: bool, queues: RoomQueues, stage: FakeStage
) -> None:
    stage.blocked("$1")  # never released
    worker = queues.worker(ROOM)
    if retried:
        queues.retry(ROOM, [msg("$1")])
    else:
        worker.push(msg("$1"))
    worker.push(msg("$2"))
    await stage.until_call("message", ROOM, "$1", retried)
    assert queues.cancel(ROOM) is True
    await stage.until_call("cancelled", ROOM, "$1")
    assert stage.has("aborted", "$1")  # the stage call itself got the cancellation
    assert stage.calls.index(("aborted", "$1")) < stage.calls.index(("cancelled", ROOM, "$1"))
    assert not stage.has("done", "$1")
    assert not stage.has("stopped", "$1")  # a !cancel is no stop
    await stage.until_done("$2")  # the queue goes on
    assert stage.calls.index(("cancelled", ROOM, "$1")) < stage.calls.index(
        ("message", ROOM, "$2", False)
    )
    assert stage.order("cancelled") == ["$1"]
    # The cancelled message is kept by the ledger, not the worker: an idle worker leaves.
    await ended(worker)
    assert ROOM not in queues.workers


async def test_cancel_with_nothing_running(queues: RoomQueues, stage: FakeStage) -> None:
    assert queues.cancel(ROOM) is False  # no worker at all
    assert ROOM not in queues.workers  # asking made none
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_done("$1")
    assert worker.cancel() is False  # done: nothing runs
    assert queues.cancel(ROOM) is False
    assert stage.order("cancelled") == []


async def test_cancel_before_the_gate_opens_leaves_the_queued_message(stage: FakeStage) -> None:
    gate = StartGate()
    queues = RoomQueues(stage, gate, LOG)
    try:
        queues.worker(ROOM).push(msg("$1"))
        await settle()
        assert queues.cancel(ROOM) is False  # queued, not under way: nothing to cancel
        gate.open()
        await stage.until_done("$1")
        assert stage.order("cancelled") == []
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


@pytest.mark.parametrize("kind", ["control", "command"])
async def test_cancel_does_not_touch_a_running_command(
    kind: str, queues: RoomQueues, stage: FakeStage
) -> None:
    release = asyncio.Event()
    if kind == "control":
        await fill(queues, stage.control("$slow", block=release))
    else:
        stage.step("$slow", block=release)
        queues.worker(ROOM).push(command("$slow"))
    await stage.until(lambda: stage.started() == [(kind, "$slow")])
    assert queues.cancel(ROOM) is False
    release.set()
    queues.worker(ROOM).push(msg("$after"))
    await stage.until_done("$after")
    assert not stage.has("aborted", "$slow")
    assert stage.order("cancelled") == []


@pytest.mark.parametrize("then", ["cancel", "stop"])
async def test_a_cancelled_call_finishes_its_clean_up_whatever_comes_next(
    then: str, queues: RoomQueues, stage: FakeStage
) -> None:
    stage.cleanup_yields = 10  # e.g. Answerer's typing off and marking a streamed answer cut
    stage.blocked("$1")
    queues.worker(ROOM).push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    assert queues.cancel(ROOM) is True
    await stage.until_call("cleaning", "$1")
    assert not stage.has("aborted", "$1")  # its clean-up is under way
    if then == "cancel":
        queues.cancel(ROOM)  # a second !cancel
        await stage.until_call("cancelled", ROOM, "$1")
    else:
        await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert stage.has("aborted", "$1")
    assert stage.order("cancelled") in ([], ["$1"])  # once at most


# --- RoomQueues.retry -------------------------------------------------------------------------


async def test_retry_pushes_the_kept_ones_oldest_first_behind_what_is_queued(
    queues: RoomQueues, stage: FakeStage
) -> None:
    running = stage.blocked("$running")
    worker = queues.worker(ROOM)
    worker.push(msg("$running"))
    await stage.until_call("message", ROOM, "$running", False)
    worker.push(msg("$queued"))
    await fill(queues, stage.control("clear"))
    queues.retry(ROOM, [msg("$old"), msg("$middle"), msg("$new")])
    worker.push(msg("$later"))
    assert worker.waiting == 5  # the retried ones are waiting messages too
    running.set()
    await stage.until_done("$later")
    assert stage.started() == [
        ("message", "$running"),
        ("message", "$queued"),
        ("control", "clear"),
        ("retry", "$old"),
        ("retry", "$middle"),
        ("retry", "$new"),
        ("message", "$later"),
    ]


async def test_retry_in_an_idle_room_makes_a_worker(queues: RoomQueues, stage: FakeStage) -> None:
    assert ROOM not in queues.workers
    queues.retry(ROOM, [msg("$k1"), msg("$k2")])
    worker = queues.workers[ROOM]
    await stage.until_done("$k1", "$k2")
    assert [call[2:] for call in stage.calls if call[0] == "message"] == [
        ("$k1", True),
        ("$k2", True),
    ]
    await ended(worker)
    assert ROOM not in queues.workers


async def test_retry_of_nothing_runs_nothing(queues: RoomQueues, stage: FakeStage) -> None:
    queues.retry(ROOM, [])
    worker = queues.workers.get(ROOM)
    assert worker is None or not worker.items
    if worker is not None:
        await ended(worker)  # made idle: it leaves
    assert ROOM not in queues.workers
    assert stage.calls == []


# --- idle workers ---------------------------------------------------------------------------


async def test_idle_worker_leaves_when_the_gate_is_open(
    queues: RoomQueues, stage: FakeStage
) -> None:
    worker = queues.worker(ROOM)
    assert queues.workers[ROOM] is worker
    worker.push(msg("$1"))
    await stage.until_done("$1")
    await ended(worker)
    assert ROOM not in queues.workers
    again = queues.worker(ROOM)  # the next message makes a new one
    assert again is not worker
    again.push(msg("$2"))
    await stage.until_done("$2")
    await ended(again)
    assert ROOM not in queues.workers


async def test_nothing_is_taken_and_no_worker_leaves_while_the_gate_is_closed(
    stage: FakeStage,
) -> None:
    gate = StartGate()
    queues = RoomQueues(stage, gate, LOG)
    try:
        worker = queues.worker(ROOM)
        worker.push(msg("$1"))
        worker.push(command("$c"))
        queues.retry(ROOM, [msg("$k")])
        await settle()
        assert stage.calls == []  # caught-up events may still go ahead of them
        assert queues.workers.get(ROOM) is worker
        assert not worker.task.done()
        gate.open()
        await stage.until_done("$1", "$c", "$k")
        assert stage.started() == [("message", "$1"), ("command", "$c"), ("retry", "$k")]
        await ended(worker)
        assert ROOM not in queues.workers
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


async def test_a_replaced_worker_does_not_remove_its_successor(
    queues: RoomQueues, stage: FakeStage
) -> None:
    old = queues.worker(ROOM)
    new = RoomWorker(ROOM, stage, queues._release, LOG, queues.gate)
    queues.workers[ROOM] = new
    busy = stage.blocked("$busy")  # keeps the new one in place meanwhile
    new.push(msg("$busy"))
    await stage.until_call("message", ROOM, "$busy", False)
    old.push(msg("$2"))
    await stage.until_done("$2")
    await settle()
    assert queues.workers.get(ROOM) is new  # the old one is no longer the room's: no removal
    assert not old.task.done()  # and it does not leave as if it were
    busy.set()
    await stage.until_done("$busy")
    await ended(new)
    assert ROOM not in queues.workers
    old.task.cancel()
    await asyncio.gather(old.task, return_exceptions=True)


# --- catch-up: push_start -------------------------------------------------------------------


async def test_push_start_puts_caught_up_items_first_in_order(
    queues: RoomQueues, stage: FakeStage
) -> None:
    running = stage.blocked("$running")
    worker = queues.worker(ROOM)
    worker.push(msg("$running"))
    await stage.until_call("message", ROOM, "$running", False)
    worker.push(msg("$live1"))
    worker.push(msg("$live2"))
    worker.push_start([msg("$missed1"), command("$missed-cmd", "clear"), msg("$missed2")])
    running.set()
    await stage.until_done("$live2")
    assert stage.started() == [
        ("message", "$running"),
        ("message", "$missed1"),
        ("command", "$missed-cmd"),
        ("message", "$missed2"),
        ("message", "$live1"),
        ("message", "$live2"),
    ]


async def test_push_start_on_an_idle_worker(queues: RoomQueues, stage: FakeStage) -> None:
    worker = queues.worker(ROOM)
    worker.push_start([msg("$m1"), msg("$m2")])
    await stage.until_done("$m1", "$m2")
    assert stage.order("done") == ["$m1", "$m2"]


async def test_caught_up_items_go_before_live_ones_queued_during_the_start(
    stage: FakeStage,
) -> None:
    gate = StartGate()
    stage.gate = gate
    queues = RoomQueues(stage, gate, LOG)
    try:
        # A live message arrives during the start: routed and queued at once, as routing.py
        # does; the real stage (Conversation.message) first waits for the gate.
        stage.step("$live", wait_gate=True)
        queues.worker(ROOM).push(msg("$live"))
        await settle()
        # The catch-up then queues what was missed at the head, and the gate opens.
        stage.step("$missed1", wait_gate=True)
        stage.step("$missed2", wait_gate=True)
        queues.worker(ROOM).push_start([msg("$missed1"), command("$missed-cmd"), msg("$missed2")])
        gate.open()
        await stage.until_done("$live", "$missed1", "$missed2")
        assert stage.order("done") == ["$missed1", "$missed-cmd", "$missed2", "$live"]
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


# --- stop -----------------------------------------------------------------------------------


@pytest.mark.parametrize("retried", [False, True], ids=["message", "retry"])
async def test_stop_calls_stopped_for_the_messages_under_way_and_ends_every_worker(
    retried: bool, stage: FakeStage, gate: StartGate
) -> None:
    queues = RoomQueues(stage, gate, LOG)
    stage.blocked("$a1")
    stage.blocked("$b1")
    a, b = queues.worker(ROOM), queues.worker(OTHER_ROOM)
    if retried:
        queues.retry(ROOM, [msg("$a1")])
    else:
        a.push(msg("$a1"))
    a.push(msg("$a2"))
    a.push(command("$a3"))
    b.push(msg("$b1", OTHER_ROOM))
    await stage.until(lambda: stage.active.get(ROOM) == 1 and stage.active.get(OTHER_ROOM) == 1)
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert sorted(stage.order("stopped")) == ["$a1", "$b1"]
    assert stage.has("aborted", "$a1")
    assert stage.has("aborted", "$b1")
    assert not stage.has("message", ROOM, "$a2", False)  # never started: nothing to stop
    assert not stage.has("command", ROOM, "$a3")
    assert stage.order("cancelled") == []  # a stop is no !cancel: no "cancelled" notice
    assert a.stopping
    assert b.stopping
    assert a.task.done()
    assert b.task.done()
    assert queues.workers == {}


async def test_stop_with_idle_and_waiting_workers(stage: FakeStage) -> None:
    gate = StartGate()  # closed: idle workers stay, nothing is taken
    queues = RoomQueues(stage, gate, LOG)
    idle = queues.worker(ROOM)
    waiting = queues.worker(OTHER_ROOM)
    waiting.push(msg("$m", OTHER_ROOM))
    waiting.push(command("$c", room_id=OTHER_ROOM))
    await settle()
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert idle.task.done()
    assert waiting.task.done()
    assert stage.calls == []  # nothing was handed to the stage: nothing is stopped
    assert queues.workers == {}


@pytest.mark.parametrize("kind", ["control", "command"])
async def test_stop_during_a_command(kind: str, stage: FakeStage, gate: StartGate) -> None:
    queues = RoomQueues(stage, gate, LOG)
    never = asyncio.Event()
    if kind == "control":
        await fill(queues, stage.control("$slow", block=never))
    else:
        stage.step("$slow", block=never)
        queues.worker(ROOM).push(command("$slow"))
    worker = queues.workers[ROOM]
    await stage.until(lambda: stage.started() == [(kind, "$slow")])
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert worker.task.done()
    assert stage.order("stopped") == []  # only a message under way is the stage's to stop
    assert stage.order("cancelled") == []


async def test_stop_after_a_stage_call_with_a_quick_cleanup(
    queues: RoomQueues, stage: FakeStage
) -> None:
    stage.blocked("$1")
    queues.worker(ROOM).push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert stage.has("aborted", "$1")
    assert stage.order("stopped") == ["$1"]
    assert stage.order("cancelled") == []


async def test_stop_waits_for_the_cancelled_stage_call(
    queues: RoomQueues, stage: FakeStage
) -> None:
    stage.cleanup_yields = 10  # e.g. Answerer's _Typing.__aexit__ sending "typing off"
    stage.blocked("$1")
    queues.worker(ROOM).push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    try:
        assert stage.has("aborted", "$1")  # the stage call has ended
        assert stage.calls.index(("aborted", "$1")) < stage.calls.index(("stopped", "$1"))
    finally:
        await stage.until_call("aborted", "$1")  # leave no task behind


# --- failures -------------------------------------------------------------------------------


def _failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOG.name and r.exc_info]


@pytest.mark.parametrize("kind", ["message", "retry", "command", "control"])
async def test_a_stage_exception_is_logged_and_the_next_item_runs(
    kind: str, queues: RoomQueues, stage: FakeStage, caplog: pytest.LogCaptureFixture
) -> None:
    error = RuntimeError("stage broke")
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        if kind == "control":
            await fill(queues, stage.control("$boom", error=error))
        else:
            stage.step("$boom", error=error)
            if kind == "message":
                queues.worker(ROOM).push(msg("$boom"))
            elif kind == "retry":
                queues.retry(ROOM, [msg("$boom")])
            else:
                queues.worker(ROOM).push(command("$boom"))
        worker = queues.workers[ROOM]
        worker.push(msg("$next"))
        worker.push(command("$next-command"))
        await stage.until_done("$next", "$next-command")
    failures = _failures(caplog)
    assert len(failures) == 1
    assert failures[0].getMessage() == f"Handling a message in {ROOM} failed"
    assert failures[0].exc_info is not None
    assert failures[0].exc_info[1] is error
    assert stage.started() == [(kind, "$boom"), ("message", "$next"), ("command", "$next-command")]
    assert not stage.has("done", "$boom")
    assert stage.order("cancelled") == []
    assert worker.current is None
    assert worker.current_item is None
    await ended(worker)  # nothing held: the idle worker leaves as usual


async def test_a_failing_cancelled_is_logged_and_the_queue_goes_on(
    queues: RoomQueues, stage: FakeStage, caplog: pytest.LogCaptureFixture
) -> None:
    stage.cancelled_error = RuntimeError("notice failed")
    stage.blocked("$1")
    worker = queues.worker(ROOM)
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        worker.push(msg("$1"))
        worker.push(msg("$2"))
        await stage.until_call("message", ROOM, "$1", False)
        assert queues.cancel(ROOM)
        await stage.until_done("$2")
    failures = _failures(caplog)
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert failures[0].exc_info[1] is stage.cancelled_error
    assert stage.order("cancelled") == ["$1"]
    await ended(worker)


# --- edits: what an edit replaces is not answered on its own --------------------------------


def edit_of(event_id: str, original: str, sender: str = USER) -> Incoming:
    return Incoming(
        Kind.MESSAGE, event_id=event_id, room_id=ROOM, sender=sender, body="edited",
        replaces=original,
    )  # fmt: skip


async def test_an_edit_drops_its_queued_original_and_earlier_edits(
    queues: RoomQueues, stage: FakeStage
) -> None:
    running = stage.blocked("$running")
    worker = queues.worker(ROOM)
    worker.push(msg("$running"))
    await stage.until_call("message", ROOM, "$running", False)
    worker.push(msg("$1"))
    worker.push(edit_of("$e1", "$1"))
    worker.push(edit_of("$e2", "$1"))  # edits always name the original
    worker.push(msg("$2"))
    worker.push(edit_of("$forged", "$2", sender="@mallory:example.org"))
    running.set()
    await stage.until_done("$forged")
    assert stage.order("superseded") == ["$1", "$e1"]
    assert stage.order("done") == ["$running", "$e2", "$2", "$forged"]


@pytest.mark.parametrize("between", [msg, command], ids=["a message", "a command"])
@pytest.mark.parametrize("running", [True, False], ids=["original running", "original queued"])
async def test_an_edit_after_another_message_leaves_the_original_to_be_answered(
    queues: RoomQueues, stage: FakeStage, running: bool, between: Callable[[str], Incoming]
) -> None:
    """A, B (or a command: !clear, !agent), then an edit of A: A is not the latest, so the
    edit is refused in its turn (the stage's business): A must still be answered, never
    dropped nor stopped."""
    ahead = "$1" if running else "$0"  # what runs while the edit arrives
    release = stage.blocked(ahead)
    worker = queues.worker(ROOM)
    for event_id in dict.fromkeys([ahead, "$1"]):
        worker.push(msg(event_id))
    await stage.until_call("message", ROOM, ahead, False)
    worker.push(between("$2"))
    worker.push(edit_of("$e1", "$1"))
    release.set()
    await stage.until_done("$1", "$2", "$e1")
    assert stage.order("superseded") == [] and not stage.has("aborted", "$1")
    assert stage.order("done")[-3:] == ["$1", "$2", "$e1"]


async def test_an_edit_stops_its_running_original_silently(
    queues: RoomQueues, stage: FakeStage
) -> None:
    stage.blocked("$1")  # never released: only the edit ends it
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    worker.push(edit_of("$e", "$1"))
    await stage.until_done("$e")
    assert stage.has("aborted", "$1") and stage.order("superseded") == ["$1"]
    assert stage.order("cancelled") == []  # no "cancelled" notice, nothing kept


async def test_an_edit_leaves_another_running_message_alone(
    queues: RoomQueues, stage: FakeStage
) -> None:
    running = stage.blocked("$2")
    worker = queues.worker(ROOM)
    worker.push(msg("$2"))
    await stage.until_call("message", ROOM, "$2", False)
    worker.push(edit_of("$e", "$1"))
    running.set()
    await stage.until_done("$2", "$e")
    assert stage.order("superseded") == []


async def test_a_start_with_a_message_and_its_edit_answers_the_edit_only(
    queues: RoomQueues, stage: FakeStage
) -> None:
    worker = queues.worker(ROOM)
    worker.push_start([msg("$1"), edit_of("$e1", "$1"), msg("$2"), edit_of("$e2", "$1")])
    await stage.until_done("$e1", "$2", "$e2")
    # $e2 came after $2: an edit of an older message, left to its turn (refused there).
    assert stage.order("superseded") == ["$1"]
    assert stage.order("done") == ["$e1", "$2", "$e2"]
