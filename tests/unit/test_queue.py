"""The room queue: one worker per room, in order, with !cancel / !retry, command slots,
caught-up items at the head, reserved places, stop, and a failing stage that is survived.

The stage is a fake that records what it is asked and can be told, per message, to block
until released, to return an outcome, or to raise. Waits are on conditions (never on time),
each bounded by asyncio.wait_for.
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
from lambda_plugin.queue import Outcome, RoomQueues, RoomWorker, filled_slot

ROOM = "!a:example.org"
OTHER_ROOM = "!b:example.org"
USER = "@alice:example.org"
TIMEOUT = 5.0
LOG = logging.getLogger("test.queue")


def msg(event_id: str, room_id: str = ROOM, body: str = "") -> Incoming:
    return Incoming(
        Kind.MESSAGE, event_id=event_id, room_id=room_id, sender=USER, body=body or event_id
    )


@dataclass
class Step:
    """What the fake stage does with one message."""

    outcome: Outcome = Outcome.ANSWERED
    block: asyncio.Event | None = None  # waits for it before returning
    error: Exception | None = None  # raised (after the block, if any)
    wait_gate: bool = False  # waits for the start gate first, as the real stage does


@dataclass
class FakeStage:
    """A Stage that records its calls as tuples in ``calls``:

    ("message", room, event_id, retried) when a message is handed over,
    ("done", event_id) when it returns, ("stopped", event_id) when it was cancelled,
    ("cancelled", room, event_id), ("interrupted", event_id), ("control", name).
    """

    gate: StartGate | None = None
    steps: dict[str, Step] = field(default_factory=dict)
    calls: list[tuple] = field(default_factory=list)
    active: dict[str, int] = field(default_factory=dict)  # room -> running message calls
    most_active: dict[str, int] = field(default_factory=dict)
    cleanup_yields: int = 0  # loop turns a cancelled call takes to clean up

    def __post_init__(self) -> None:
        self._changed = asyncio.Event()

    def record(self, *call: Any) -> None:
        self.calls.append(call)
        self._changed.set()

    def step(self, event_id: str, **kwargs: Any) -> Step:
        found = self.steps[event_id] = Step(**kwargs)
        return found

    def blocked(self, event_id: str, **kwargs: Any) -> asyncio.Event:
        """Makes the message block until the returned event is set."""
        release = asyncio.Event()
        self.step(event_id, block=release, **kwargs)
        return release

    async def message(self, room_id: str, incoming: Incoming, retried: bool) -> Outcome:
        step = self.steps.get(incoming.event_id, Step())
        self.record("message", room_id, incoming.event_id, retried)
        self.active[room_id] = self.active.get(room_id, 0) + 1
        self.most_active[room_id] = max(self.most_active.get(room_id, 0), self.active[room_id])
        try:
            if step.wait_gate:
                assert self.gate is not None
                await self.gate.wait()
            if step.block is not None:
                await step.block.wait()
            if step.error is not None:
                raise step.error
            self.record("done", incoming.event_id)
            return step.outcome
        except asyncio.CancelledError:
            for _ in range(self.cleanup_yields):
                await asyncio.sleep(0)
            self.record("stopped", incoming.event_id)
            raise
        finally:
            self.active[room_id] -= 1

    async def cancelled(self, room_id: str, incoming: Incoming) -> None:
        self.record("cancelled", room_id, incoming.event_id)

    async def interrupted(self, incoming: Incoming) -> None:
        self.record("interrupted", incoming.event_id)

    def control(self, name: str) -> Callable[[], Awaitable[None]]:
        """What a command runs in its turn: records its name."""

        async def run() -> None:
            self.record("control", name)

        return run

    # --- reading the record ---

    def order(self, kind: str = "done") -> list[str]:
        """Event ids (or control names) in the order of the calls of ``kind``."""
        at = 2 if kind in ("message", "cancelled") else 1
        return [call[at] for call in self.calls if call[0] == kind]

    def sequence(self) -> list[str]:
        """Finished messages and run controls, as one sequence."""
        return [call[1] for call in self.calls if call[0] in ("done", "control")]

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


async def test_each_message_waits_for_the_one_before(queues: RoomQueues, stage: FakeStage) -> None:
    releases = {e: stage.blocked(e) for e in ("$1", "$2", "$3")}
    worker = queues.worker(ROOM)
    for event_id in releases:
        worker.push(msg(event_id))
    for event_id in releases:
        await stage.until_call("message", ROOM, event_id, False)
        await settle()
        assert stage.order("message")[-1] == event_id  # nothing past it has started
        releases[event_id].set()
    await stage.until_done("$3")
    assert stage.order("done") == ["$1", "$2", "$3"]
    assert stage.most_active[ROOM] == 1


async def test_rooms_are_independent(queues: RoomQueues, stage: FakeStage) -> None:
    blocked = stage.blocked("$a1")
    queues.worker(ROOM).push(msg("$a1"))
    queues.worker(ROOM).push(msg("$a2"))
    await stage.until_call("message", ROOM, "$a1", False)
    queues.worker(OTHER_ROOM).push(msg("$b1", OTHER_ROOM))
    queues.worker(OTHER_ROOM).push(msg("$b2", OTHER_ROOM))
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


# --- command slots --------------------------------------------------------------------------


async def test_in_turn_slot_runs_between_the_right_messages(
    queues: RoomQueues, stage: FakeStage
) -> None:
    first = stage.blocked("$1")
    queues.worker(ROOM).push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    async with queues.in_turn(ROOM) as slot:
        slot.set_result(stage.control("clear"))
    queues.worker(ROOM).push(msg("$2"))
    async with queues.in_turn(ROOM) as slot:
        slot.set_result(stage.control("agent"))
    queues.worker(ROOM).push(msg("$3"))
    assert queues.worker(ROOM).waiting == 2  # slots are not counted as waiting messages
    first.set()
    await stage.until_done("$3")
    assert stage.sequence() == ["$1", "clear", "$2", "agent", "$3"]


async def test_unfilled_slot_holds_the_queue_until_filled(
    queues: RoomQueues, stage: FakeStage
) -> None:
    command_checked = asyncio.Event()

    async def command() -> None:
        async with queues.in_turn(ROOM) as slot:  # its place is taken at once
            await command_checked.wait()  # checking arguments, talking to the homeserver…
            slot.set_result(stage.control("cmd"))

    task = asyncio.create_task(command())
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
    async with queues.in_turn(ROOM) as slot:
        slot.set_result(None)  # the command had nothing to do in turn
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


async def test_filled_slot_runs_its_control(queues: RoomQueues, stage: FakeStage) -> None:
    queues.worker(ROOM).push(filled_slot(stage.control("unknown")))
    queues.worker(ROOM).push(msg("$1"))
    await stage.until_done("$1")
    assert stage.sequence() == ["unknown", "$1"]


# --- cancel / retry / outcomes ----------------------------------------------------------------


async def test_cancel_stops_the_running_call(queues: RoomQueues, stage: FakeStage) -> None:
    stage.blocked("$1")  # never released
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    worker.push(msg("$2"))
    await stage.until_call("message", ROOM, "$1", False)
    assert queues.cancel(ROOM) is True
    await stage.until_call("cancelled", ROOM, "$1")
    assert stage.has("stopped", "$1")  # the stage call itself got the cancellation
    assert not stage.has("done", "$1")
    assert worker.unanswered == msg("$1")
    assert queues.has_unanswered(ROOM)
    await stage.until_done("$2")  # the queue goes on
    # $2 was answered, so nothing is left to retry
    assert not queues.has_unanswered(ROOM)
    assert stage.calls.index(("cancelled", ROOM, "$1")) < stage.calls.index(
        ("message", ROOM, "$2", False)
    )


async def test_cancelled_message_is_kept_and_the_worker_stays(
    queues: RoomQueues, stage: FakeStage
) -> None:
    stage.blocked("$1")
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    assert worker.cancel()
    await stage.until_call("cancelled", ROOM, "$1")
    await settle()
    assert worker.unanswered == msg("$1")
    assert queues.workers.get(ROOM) is worker  # kept for !retry
    assert not worker.task.done()


async def test_cancel_with_nothing_running(queues: RoomQueues, stage: FakeStage) -> None:
    assert queues.cancel(ROOM) is False  # no worker at all
    assert ROOM not in queues.workers  # asking made none
    stage.step("$1", outcome=Outcome.KEEP)
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_done("$1")
    await settle()
    assert worker.cancel() is False  # idle (kept for its unanswered message)
    assert queues.cancel(ROOM) is False
    assert not stage.has("cancelled", ROOM, "$1")


async def test_cancel_does_not_touch_a_running_command(
    queues: RoomQueues, stage: FakeStage
) -> None:
    release = asyncio.Event()

    async def slow() -> None:
        await release.wait()
        stage.record("control", "slow")

    queues.worker(ROOM).push(filled_slot(slow))
    await settle()
    assert queues.cancel(ROOM) is False
    release.set()
    await stage.until_call("control", "slow")


async def test_retry_sends_the_kept_message_again(queues: RoomQueues, stage: FakeStage) -> None:
    stage.step("$1", outcome=Outcome.KEEP)
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_done("$1")
    await settle()
    assert worker.unanswered == msg("$1")
    stage.step("$1", outcome=Outcome.ANSWERED)
    assert queues.retry(ROOM) is True
    assert worker.unanswered is None  # taken; set again only if the retry fails too
    await stage.until_call("message", ROOM, "$1", True)
    await stage.until(lambda: stage.order("done") == ["$1", "$1"])
    await ended(worker)  # answered now: nothing kept, so the idle worker leaves
    assert ROOM not in queues.workers
    assert queues.retry(ROOM) is False


async def test_retry_of_a_cancelled_message(queues: RoomQueues, stage: FakeStage) -> None:
    stage.blocked("$1")
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    worker.cancel()
    await stage.until_call("cancelled", ROOM, "$1")
    stage.step("$1")  # answers this time
    assert worker.retry() is True
    await stage.until_call("message", ROOM, "$1", True)
    await stage.until_done("$1")
    await ended(worker)
    assert worker.unanswered is None


async def test_retry_waits_its_turn(queues: RoomQueues, stage: FakeStage) -> None:
    stage.step("$1", outcome=Outcome.KEEP)
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_done("$1")
    release = stage.blocked("$2")
    worker.push(msg("$2"))
    await stage.until_call("message", ROOM, "$2", False)
    # $2 returns ANSWERED (below), but the retry was taken before: it still runs
    assert worker.retry() is True
    worker.push(msg("$3"))
    release.set()
    await stage.until_done("$3")
    assert [c[2:] for c in stage.calls if c[0] == "message"] == [
        ("$1", False),
        ("$2", False),
        ("$1", True),
        ("$3", False),
    ]


async def test_retry_that_fails_again_is_kept_again(queues: RoomQueues, stage: FakeStage) -> None:
    stage.step("$1", outcome=Outcome.KEEP)
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_done("$1")
    assert worker.retry()
    await stage.until_call("message", ROOM, "$1", True)
    await stage.until(lambda: stage.order("done") == ["$1", "$1"])
    await settle()
    assert worker.unanswered == msg("$1")


async def test_retry_with_nothing_kept(queues: RoomQueues, stage: FakeStage) -> None:
    assert queues.retry(ROOM) is False
    assert ROOM not in queues.workers
    assert not queues.has_unanswered(ROOM)
    worker = queues.worker(ROOM)
    assert worker.retry() is False
    assert not worker.items


async def test_outcomes_keep_clear_and_skip(queues: RoomQueues, stage: FakeStage) -> None:
    stage.step("$keep", outcome=Outcome.KEEP)
    stage.step("$skip", outcome=Outcome.SKIPPED)
    stage.step("$answer", outcome=Outcome.ANSWERED)
    worker = queues.worker(ROOM)
    hold = stage.blocked("$hold")
    worker.push(msg("$hold"))
    await stage.until_call("message", ROOM, "$hold", False)

    worker.push(msg("$keep"))
    hold.set()
    await stage.until_done("$keep")
    await settle()
    assert worker.unanswered == msg("$keep")

    worker.push(msg("$skip"))
    await stage.until_done("$skip")
    await settle()
    assert worker.unanswered == msg("$keep")  # a skipped message changes nothing

    worker.push(msg("$answer"))
    await stage.until_done("$answer")
    await ended(worker)
    assert worker.unanswered is None


async def test_keep_replaces_the_previous_unanswered(queues: RoomQueues, stage: FakeStage) -> None:
    stage.step("$1", outcome=Outcome.KEEP)
    stage.step("$2", outcome=Outcome.KEEP)
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    worker.push(msg("$2"))
    await stage.until_done("$2")
    await settle()
    assert worker.unanswered == msg("$2")


async def test_skipped_alone_leaves_nothing_to_retry(queues: RoomQueues, stage: FakeStage) -> None:
    stage.step("$1", outcome=Outcome.SKIPPED)
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_done("$1")
    await ended(worker)
    assert worker.unanswered is None
    assert not queues.has_unanswered(ROOM)


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
        await settle()
        assert stage.order("message") == []  # caught-up messages may still go ahead of it
        assert queues.workers.get(ROOM) is worker
        assert not worker.task.done()
        gate.open()
        await stage.until_done("$1")
        await ended(worker)
        assert ROOM not in queues.workers
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


async def test_idle_worker_with_an_unanswered_message_stays(
    queues: RoomQueues, stage: FakeStage
) -> None:
    stage.step("$1", outcome=Outcome.KEEP)
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    await stage.until_done("$1")
    await settle()
    assert queues.workers.get(ROOM) is worker
    assert not worker.task.done()
    assert queues.has_unanswered(ROOM)
    stage.step("$2", outcome=Outcome.ANSWERED)
    worker.push(msg("$2"))  # a later message answered: nothing left to retry
    await stage.until_done("$2")
    await ended(worker)
    assert ROOM not in queues.workers


async def test_a_replaced_worker_does_not_remove_its_successor(
    queues: RoomQueues, stage: FakeStage, gate: StartGate
) -> None:
    old = queues.worker(ROOM)
    new = RoomWorker(ROOM, stage, queues._release, LOG, queues.gate)
    queues.workers[ROOM] = new
    stage.step("$kept", outcome=Outcome.KEEP)  # keeps the new one in place meanwhile
    new.push(msg("$kept"))
    await stage.until_done("$kept")
    old.push(msg("$2"))
    await stage.until_done("$2")
    await settle()
    assert queues.workers.get(ROOM) is new  # the old one is no longer the room's: no removal
    stage.step("$3", outcome=Outcome.ANSWERED)
    new.push(msg("$3"))
    await stage.until_done("$3")
    await ended(new)
    assert ROOM not in queues.workers
    old.task.cancel()
    await asyncio.gather(old.task, return_exceptions=True)


# --- catch-up: push_front, reserved places ------------------------------------------------------


async def test_push_front_puts_caught_up_items_first_in_order(
    queues: RoomQueues, stage: FakeStage
) -> None:
    running = stage.blocked("$running")
    worker = queues.worker(ROOM)
    worker.push(msg("$running"))
    await stage.until_call("message", ROOM, "$running", False)
    worker.push(msg("$live1"))
    worker.push(msg("$live2"))
    worker.push_front([msg("$missed1"), filled_slot(stage.control("missed-cmd")), msg("$missed2")])
    assert worker.waiting == 4
    running.set()
    await stage.until_done("$live2")
    assert stage.sequence() == [
        "$running",
        "$missed1",
        "missed-cmd",
        "$missed2",
        "$live1",
        "$live2",
    ]


async def test_push_front_on_an_idle_worker(stage: FakeStage) -> None:
    gate = StartGate()
    gate.open()
    queues = RoomQueues(stage, gate, LOG)
    try:
        worker = queues.worker(ROOM)
        worker.push_front([msg("$m1"), msg("$m2")])
        await stage.until_done("$m1", "$m2")
        assert stage.order("done") == ["$m1", "$m2"]
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


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
        queues.worker(ROOM).push_front([msg("$missed1"), msg("$missed2")])
        gate.open()
        await stage.until_done("$live", "$missed1", "$missed2")
        assert stage.order("done") == ["$missed1", "$missed2", "$live"]
    finally:
        await asyncio.wait_for(queues.stop(), TIMEOUT)


async def test_reserved_place_is_taken_by_in_turn(queues: RoomQueues, stage: FakeStage) -> None:
    running = stage.blocked("$running")
    worker = queues.worker(ROOM)
    worker.push(msg("$running"))
    await stage.until_call("message", ROOM, "$running", False)
    worker.push(msg("$live"))
    place = queues.reserve("$cmd")
    worker.push_front([msg("$missed1"), place, msg("$missed2")])
    queued = len(worker.items)
    async with queues.in_turn(ROOM, "$cmd") as slot:
        assert slot is place
        assert len(worker.items) == queued  # no new place at the back
        slot.set_result(stage.control("cmd"))
    running.set()
    await stage.until_done("$live")
    assert stage.sequence() == ["$running", "$missed1", "cmd", "$missed2", "$live"]


async def test_reserved_place_holds_the_queue_until_taken(
    queues: RoomQueues, stage: FakeStage
) -> None:
    worker = queues.worker(ROOM)
    place = queues.reserve("$cmd")
    worker.push_front([place, msg("$after")])
    await settle()
    assert not stage.has("message", ROOM, "$after", False)
    async with queues.in_turn(ROOM, "$cmd") as slot:
        slot.set_result(stage.control("cmd"))
    await stage.until_done("$after")
    assert stage.sequence() == ["cmd", "$after"]


async def test_in_turn_for_another_event_does_not_take_a_reservation(
    queues: RoomQueues, stage: FakeStage
) -> None:
    worker = queues.worker(ROOM)
    place = queues.reserve("$cmd")
    worker.push_front([place, msg("$after")])
    async with queues.in_turn(ROOM, "$other") as slot:
        assert slot is not place
        slot.set_result(stage.control("other"))
    await settle()
    assert stage.sequence() == []  # both wait behind the unclaimed reservation
    queues.release_reserved(["$cmd"])
    await stage.until_done("$after")
    assert stage.sequence() == ["$after", "other"]


async def test_release_reserved_lets_the_queue_move_on(
    queues: RoomQueues, stage: FakeStage
) -> None:
    worker = queues.worker(ROOM)
    first, second = queues.reserve("$c1"), queues.reserve("$c2")
    worker.push_front([msg("$m1"), first, msg("$m2"), second, msg("$m3")])
    await stage.until_done("$m1")
    await settle()
    assert not stage.has("message", ROOM, "$m2", False)
    queues.release_reserved(["$c1", "$c2", "$never-reserved"])
    await stage.until_done("$m2", "$m3")
    assert stage.sequence() == ["$m1", "$m2", "$m3"]
    assert first.result() is None
    assert second.result() is None


async def test_release_reserved_leaves_a_taken_place_alone(
    queues: RoomQueues, stage: FakeStage
) -> None:
    running = stage.blocked("$running")
    worker = queues.worker(ROOM)
    worker.push(msg("$running"))
    await stage.until_call("message", ROOM, "$running", False)
    place = queues.reserve("$cmd")
    worker.push_front([place, msg("$after")])
    async with queues.in_turn(ROOM, "$cmd") as slot:
        slot.set_result(stage.control("cmd"))
    queues.release_reserved(["$cmd"])  # as CatchUp.dispatch does for every missed command
    running.set()
    await stage.until_done("$after")
    assert stage.sequence() == ["$running", "cmd", "$after"]


async def test_a_released_reservation_is_not_taken_later(
    queues: RoomQueues, stage: FakeStage
) -> None:
    place = queues.reserve("$cmd")
    queues.release_reserved(["$cmd"])
    async with queues.in_turn(ROOM, "$cmd") as slot:
        assert slot is not place  # a fresh place at the back
        slot.set_result(stage.control("late"))
    await stage.until_call("control", "late")


# --- stop -----------------------------------------------------------------------------------


async def test_stop_interrupts_the_running_messages_and_ends_every_worker(
    stage: FakeStage, gate: StartGate
) -> None:
    queues = RoomQueues(stage, gate, LOG)
    stage.blocked("$a1")
    stage.blocked("$b1")
    a, b = queues.worker(ROOM), queues.worker(OTHER_ROOM)
    a.push(msg("$a1"))
    a.push(msg("$a2"))
    b.push(msg("$b1", OTHER_ROOM))
    await stage.until(lambda: stage.active.get(ROOM) == 1 and stage.active.get(OTHER_ROOM) == 1)
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert sorted(stage.order("interrupted")) == ["$a1", "$b1"]
    assert not stage.has("interrupted", "$a2")  # never started: nothing to undo
    assert not stage.has("message", ROOM, "$a2", False)
    assert not any(c[0] == "cancelled" for c in stage.calls)  # no "cancelled" notice on stop
    assert a.task.done()
    assert b.task.done()
    assert queues.workers == {}


async def test_stop_with_idle_workers_and_open_slots(stage: FakeStage) -> None:
    gate = StartGate()  # closed: idle workers stay
    queues = RoomQueues(stage, gate, LOG)
    idle = queues.worker(ROOM)
    waiting = queues.worker(OTHER_ROOM)
    place = queues.reserve("$cmd")
    waiting.push_front([place])
    await settle()
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert idle.task.done()
    assert waiting.task.done()
    assert place.done()  # reservations are let go
    assert stage.order("interrupted") == []
    assert queues.workers == {}


async def test_stop_interrupts_only_messages_the_stage_was_handed(stage: FakeStage) -> None:
    queues = RoomQueues(stage, StartGate(), LOG)
    worker = queues.worker(ROOM)
    place = queues.reserve("$cmd")
    worker.push_front([place, msg("$after")])
    await settle()
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert worker.task.done()
    handed = {call[2] for call in stage.calls if call[0] == "message"}
    assert set(stage.order("interrupted")) <= handed


async def test_stop_during_a_command(stage: FakeStage, gate: StartGate) -> None:
    queues = RoomQueues(stage, gate, LOG)
    never = asyncio.Event()

    async def slow() -> None:
        await never.wait()

    worker = queues.worker(ROOM)
    worker.push(filled_slot(slow))
    await settle()
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert worker.task.done()
    assert stage.order("interrupted") == []


async def test_stop_after_a_stage_call_with_a_quick_cleanup(stage: FakeStage) -> None:
    gate = StartGate()
    gate.open()
    queues = RoomQueues(stage, gate, LOG)
    stage.blocked("$1")
    queues.worker(ROOM).push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    assert stage.has("stopped", "$1")
    assert stage.has("interrupted", "$1")


async def test_stop_waits_for_the_cancelled_stage_call(stage: FakeStage) -> None:
    gate = StartGate()
    gate.open()
    stage.cleanup_yields = 10  # e.g. Answerer's _Typing.__aexit__ sending "typing off"
    queues = RoomQueues(stage, gate, LOG)
    stage.blocked("$1")
    queues.worker(ROOM).push(msg("$1"))
    await stage.until_call("message", ROOM, "$1", False)
    await asyncio.wait_for(queues.stop(), TIMEOUT)
    try:
        assert stage.has("stopped", "$1")  # the stage call has ended
        assert stage.calls.index(("stopped", "$1")) < stage.calls.index(("interrupted", "$1"))
    finally:
        await stage.until_call("stopped", "$1")  # leave no task behind


# --- failures -------------------------------------------------------------------------------


async def test_stage_exception_is_logged_and_the_worker_goes_on(
    queues: RoomQueues, stage: FakeStage, caplog: pytest.LogCaptureFixture
) -> None:
    stage.step("$boom", error=RuntimeError("stage broke"))
    worker = queues.worker(ROOM)
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        worker.push(msg("$boom"))
        worker.push(msg("$next"))
        await stage.until_done("$next")
    failures = [r for r in caplog.records if r.name == LOG.name and r.exc_info]
    assert len(failures) == 1
    assert ROOM in failures[0].getMessage()
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], RuntimeError)
    assert stage.order("message") == ["$boom", "$next"]
    await ended(worker)  # nothing kept: the idle worker leaves as usual


async def test_failing_command_is_logged_and_the_worker_goes_on(
    queues: RoomQueues, stage: FakeStage, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise KeyError("oops")

    worker = queues.worker(ROOM)
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        worker.push(filled_slot(broken))
        worker.push(msg("$next"))
        await stage.until_done("$next")
    failures = [r for r in caplog.records if r.name == LOG.name and r.exc_info]
    assert len(failures) == 1
    assert isinstance(failures[0].exc_info[1], KeyError)


async def test_exception_keeps_an_earlier_unanswered_message(
    queues: RoomQueues, stage: FakeStage
) -> None:
    stage.step("$1", outcome=Outcome.KEEP)
    stage.step("$boom", error=RuntimeError("stage broke"))
    worker = queues.worker(ROOM)
    worker.push(msg("$1"))
    worker.push(msg("$boom"))
    worker.push(msg("$3"))
    stage.step("$3", outcome=Outcome.SKIPPED)
    await stage.until_done("$3")
    await settle()
    assert worker.unanswered == msg("$1")
    assert worker.current is None
    assert worker.current_item is None
