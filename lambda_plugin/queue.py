"""The room's queue: one worker per room answers its messages one after another.

Rooms are independent (one slow agent never holds up another room); within a room, messages
and the commands that change the conversation run in the order they arrived. The worker
knows nothing of agents or Matrix: it hands each message to a ``Stage`` (the ledger, there,
keeps every message's fate) and can cancel the running one. An idle worker leaves; the next
message makes a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from .gate import StartGate
from .intake import Incoming, Kind

Control = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Retry:
    """A kept message sent again by !retry: it passes the same checks as a new one."""

    incoming: Incoming


# What a room's queue holds: a message or a command that reached no handler of maubot's (a
# caught-up one, an unknown one), a retried message, or a live command's slot, filled with
# what the command wants done in turn (or None) once it has checked its arguments.
QueueItem = Incoming | Retry | asyncio.Future


class Stage(Protocol):
    async def message(self, room_id: str, incoming: Incoming, retried: bool) -> None: ...

    async def command(self, incoming: Incoming) -> None: ...

    async def cancelled(self, room_id: str, incoming: Incoming) -> None: ...

    def stopped(self, incoming: Incoming) -> None: ...

    def supersedes(self, edit: Incoming, earlier: Incoming) -> bool: ...

    def superseded(self, incoming: Incoming) -> None: ...


@dataclass(eq=False)
class RoomWorker:
    """Works through one room's queue; exits when idle."""

    room_id: str
    stage: Stage
    release: Callable[[RoomWorker], bool]
    log: logging.Logger
    gate: StartGate

    def __post_init__(self) -> None:
        self.items: deque[QueueItem] = deque()
        self._wakeup = asyncio.Event()
        self.current: asyncio.Task | None = None
        self.current_item: Incoming | None = None  # the message handed to the stage
        self.slot_events: dict[asyncio.Future, str] = {}  # a live command's slot -> its event
        self.stopping = False
        self.replaced: str = ""  # the running message an edit stopped (not a !cancel)
        self.task = asyncio.create_task(self._run())

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.items)

    @property
    def places(self) -> int:
        """Everything queued behind the running item: messages, commands, retries."""
        return len(self.items)

    @property
    def waiting(self) -> int:
        """Messages queued behind the one being answered (commands not counted)."""
        return sum(
            1
            for item in self.items
            if isinstance(item, Retry) or (isinstance(item, Incoming) and item.is_message)
        )

    def push(self, item: QueueItem) -> None:
        if isinstance(item, Incoming) and item.replaces:
            self._supersede(item)
        self.items.append(item)
        self._wakeup.set()

    def _supersede(self, edit: Incoming, ahead: int | None = None) -> None:
        """An edit replaces what it edits that is still queued ahead of it (``ahead``: how
        many places are; None: all) or running: dropped, or stopped silently; the edited
        text is answered in its place. Not when a message of another turn or a command came
        between: then the edit is of an older message (refused in its turn) and the
        original stays."""
        queued = [(item, _incoming(item)) for item in list(self.items)[:ahead]]
        forms = [(n, item, found) for n, (item, found) in enumerate(queued)
                 if found is not None and self.stage.supersedes(edit, found)]  # fmt: skip
        running = self.current_item
        runs = running is not None and self.stage.supersedes(edit, running)
        if not forms and not runs:
            return
        between = queued[0 if runs else forms[0][0] + 1 :]
        if any(_barrier(item, found, edit) for item, found in between):
            return
        for _, item, found in forms:
            self.items.remove(item)
            self.stage.superseded(found)
        if running is not None and runs and self.cancel():
            self.replaced = running.event_id

    def push_start(self, items: list[Incoming]) -> None:
        """Puts a start's events at the head, in order, each once: a command whose live
        slot is queued already (maubot dispatched it during the start) goes there as that
        slot, and live copies of the start's events leave their later places."""
        ids = {incoming.event_id for incoming in items}
        slots = {event_id: slot for slot, event_id in self.slot_events.items() if event_id in ids}
        rest = [
            item for item in self.items
            if not (isinstance(item, Incoming) and item.event_id in ids)
            and not (isinstance(item, asyncio.Future) and self.slot_events.get(item) in ids)
        ]  # fmt: skip
        head: list[QueueItem] = [slots.get(incoming.event_id, incoming) for incoming in items]
        self.items = deque([*head, *rest])
        for incoming in items:  # in order: an edit drops only what came before it
            if not incoming.replaces:
                continue
            place = next((n for n, item in enumerate(self.items) if item is incoming), None)
            if place is not None:
                self._supersede(incoming, place)
        self._wakeup.set()

    def cancel(self) -> bool:
        # Once only: a call already cancelling is left to finish its clean-up.
        if self.current is None or self.current.done() or self.current.cancelling():
            return False
        self.current.cancel()
        return True

    async def stop(self) -> None:
        """Stops the worker; a message under way stays unfinished in the ledger, so the
        next start answers it (nothing is unmarked, nothing held in memory is lost)."""
        call, interrupted = self.current, self.current_item
        self.stopping = True
        self.cancel()
        self.task.cancel()
        # The cancelled stage call too: its clean-up (typing off) ends before stop() does.
        await asyncio.gather(self.task, *([call] if call else []), return_exceptions=True)
        if interrupted is not None:
            self.stage.stopped(interrupted)

    async def _run(self) -> None:
        while True:
            # Nothing is taken while the gate is closed: what the catch-up puts at the head
            # of the queue goes before what arrived during the start.
            if not self.gate.is_open and not await self.gate.wait():
                return
            if not self.items:
                # Idle: leave (no await between the check and the removal, so nothing can be
                # queued here meanwhile); the next message makes a new worker.
                if self.release(self):
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item = self.items.popleft()
            try:
                await self._do(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("Handling a message in %s failed", self.room_id)

    async def _do(self, item: QueueItem) -> None:
        if isinstance(item, asyncio.Future):
            self.slot_events.pop(item, None)
            control = await item
            if control is not None:
                await control()
        elif isinstance(item, Retry):
            await self._message(item.incoming, retried=True)
        elif item.kind is Kind.COMMAND:
            await self.stage.command(item)
        else:
            await self._message(item, retried=False)

    async def _hand(self, incoming: Incoming, retried: bool) -> None:
        self.current_item = incoming  # only now is it the stage's (a stop before this: not)
        await self.stage.message(self.room_id, incoming, retried)

    async def _message(self, incoming: Incoming, retried: bool) -> None:
        """Runs the stage as a task of its own, so !cancel stops it wherever it is."""
        call = self.current = asyncio.create_task(self._hand(incoming, retried))
        await asyncio.wait({call})
        self.current = self.current_item = None
        replaced, self.replaced = self.replaced == incoming.event_id, ""
        if call.cancelled() and replaced and not self.stopping:
            self.stage.superseded(incoming)
        elif call.cancelled() and not self.stopping:
            await self.stage.cancelled(self.room_id, incoming)
        elif not call.cancelled() and call.exception() is not None:
            raise call.exception()  # type: ignore[misc]  # logged by _run


def _incoming(item: QueueItem) -> Incoming | None:
    found = item.incoming if isinstance(item, Retry) else item
    return found if isinstance(found, Incoming) else None


def _barrier(item: QueueItem, found: Incoming | None, edit: Incoming) -> bool:
    """What an edit can't reach across in the queue: a message of another conversation
    turn, or a command (``!clear``, ``!agent``: the original is answered in the conversation
    it was sent to, and the edit answers again after the command, in its turn)."""
    if isinstance(item, asyncio.Future) or (found is not None and found.kind is Kind.COMMAND):
        return True
    return found is not None and found.kind is Kind.MESSAGE and found.turn != edit.turn


class QueueFull(Exception):
    """A command finds its room's queue full (``access.max_queue_per_room``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


@dataclass(eq=False)
class RoomQueues:
    """Every room's worker, made on the first message and gone when idle."""

    stage: Stage
    gate: StartGate
    log: logging.Logger
    workers: dict[str, RoomWorker] = field(default_factory=dict)
    max_places: Callable[[], int] = lambda: 0  # per room, once started; 0: no limit

    def worker(self, room_id: str) -> RoomWorker:
        worker = self.workers.get(room_id)
        if worker is None:
            worker = self.workers[room_id] = RoomWorker(room_id, self.stage, self._release, self.log, self.gate)
        return worker

    def _release(self, worker: RoomWorker) -> bool:
        # Before the gate opens, a worker stays: caught-up messages are still to come.
        if self.workers.get(worker.room_id) is not worker or not self.gate.is_open:
            return False
        del self.workers[worker.room_id]
        return True

    def cancel(self, room_id: str) -> bool:
        worker = self.workers.get(room_id)
        return worker is not None and worker.cancel()

    def busy_rooms(self) -> int:
        return sum(1 for worker in self.workers.values() if worker.busy)

    @asynccontextmanager
    async def in_turn(self, room_id: str, event_id: str = "") -> AsyncIterator[asyncio.Future]:
        """A place in the room's queue, taken at once (so in the order events arrived); the
        command sets the future's result to what should run there, or leaves it empty. A
        start that has the same event moves the place to where the event is in the room."""
        worker = self.worker(room_id)
        limit = self.max_places()
        if limit and self.gate.is_open and worker.places >= limit:
            raise QueueFull(limit)
        slot = asyncio.get_running_loop().create_future()
        if event_id:
            worker.slot_events[slot] = event_id
        worker.push(slot)
        try:
            yield slot
        finally:
            if not slot.done():
                slot.set_result(None)

    def retry(self, room_id: str, kept: list[Incoming]) -> None:
        """Sends kept messages again, oldest first, behind what is queued now."""
        worker = self.worker(room_id)
        for incoming in kept:
            worker.push(Retry(incoming))

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers.values()))
        self.workers.clear()
