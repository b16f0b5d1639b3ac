"""Live delivery: each room message is classified and queued in its room, in the order
maubot dispatched it. Known commands are maubot's command handlers' to answer."""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass, field

from maubot import MessageEvent
from maubot.handlers import event
from mautrix.types import EventType

from .gate import StartGate
from .intake import Incoming, Kind, as_json, classify
from .ledger import Ledger
from .matrix import Matrix
from .notices import Notices
from .part import Part
from .policy import Admission, admit
from .queue import RoomQueues
from .registry import Registry


class Queued(enum.Enum):
    NOW = "now"  # queued, and next in turn
    WAITS = "waits"  # queued behind others
    FULL = "full"  # the room's queue has no place (access.max_queue_per_room)
    NOT = "not"  # not a message (a command, or nothing)


@dataclass(eq=False, kw_only=True)
class Router(Part):
    """Routes live messages (and what maubot's first sync held) into the rooms' queues."""

    queues: RoomQueues
    ledger: Ledger
    registry: Registry
    gate: StartGate
    notices: Notices
    command_names: Collection[str]
    _told_full: set[str] = field(default_factory=set)  # rooms told their queue is full
    # Receipts: one request a room at a time, for the newest waiting message (a receipt
    # covers what came before it): a burst costs a few, not one each.
    _receipt_due: dict[str, str] = field(default_factory=dict)  # room -> newest not sent

    @property
    def mx(self) -> Matrix:
        return self.notices.mx

    @event.on(EventType.ROOM_MESSAGE)
    async def on_message(self, evt: MessageEvent) -> None:
        await self.route(classify(as_json(evt), self.mx.user_id))

    async def route(self, incoming: Incoming) -> None:
        """Queues a message or an unknown command in its room (see ``enqueue``); a message
        that has to wait its turn gets a read receipt, so the user sees it arrived, and one
        the queue has no place for a notice, once while the queue is full."""
        queued = self.enqueue(incoming)
        if queued is Queued.WAITS and self.gate.is_open:
            await self._receipt(incoming.room_id, incoming.event_id)
        elif queued is Queued.FULL and incoming.room_id not in self._told_full:
            self._told_full.add(incoming.room_id)
            limit = self.settings().max_queue_per_room
            await self.notices.say(
                incoming.room_id, "queue.full", max=limit, reply_to=incoming.event_id
            )

    async def _receipt(self, room_id: str, event_id: str) -> None:
        """Sends the room's read receipt up to ``event_id``, unless one is on its way: then
        that sender sends this one next (the newest only)."""
        sending = room_id in self._receipt_due
        self._receipt_due[room_id] = event_id
        if sending:
            return
        try:
            while (due := self._receipt_due.get(room_id)) is not None:
                await self.mx.receipt(room_id, due)
                if self._receipt_due.get(room_id) == due:
                    break
        finally:
            self._receipt_due.pop(room_id, None)

    def enqueue(self, incoming: Incoming, replay: bool = False) -> Queued:
        """Puts a message or a command no handler of maubot's gets (an unknown one, or with
        ``replay`` one that reached none: missed, decrypted late) into its room's queue
        without awaiting anything: handlers run as unordered tasks, and the room's order
        must hold. A queued message is recorded as seen in the ledger. Policy comes first:
        what the room does not answer (another member's, with ``access.shared_rooms``
        off) takes no place and gets no word, only its fate in the ledger."""
        if incoming.kind is Kind.IGNORED:
            return Queued.NOT
        known_live = not replay and incoming.command in self.command_names
        if incoming.kind is Kind.COMMAND and known_live:
            return Queued.NOT  # its handler's, with its own preconditions
        if self._left(incoming):
            self.ledger.left(incoming, "not the room's to answer")
            return Queued.NOT
        # Full counts every place (commands too); during a start nothing is refused (what
        # arrives then is bounded by one sync, and nothing is said before the rooms are read).
        full = not replay and self._full(incoming.room_id)
        if incoming.kind is Kind.COMMAND:
            if full:
                return Queued.FULL
            self.queues.worker(incoming.room_id).push(incoming)
            return Queued.NOT
        if full:
            return Queued.FULL  # not taken: the user is told, and may send it again later
        worker = self.queues.worker(incoming.room_id)
        self._told_full.discard(incoming.room_id)
        waits = worker.busy
        worker.push(incoming)
        self.ledger.seen(incoming)
        return Queued.WAITS if waits else Queued.NOW

    def _full(self, room_id: str) -> bool:
        worker = self.queues.workers.get(room_id)
        limit = self.settings().max_queue_per_room
        return self.gate.is_open and worker is not None and worker.places >= limit

    def _left(self, incoming: Incoming) -> bool:
        """A chat room's message or command from someone it does not answer (decided once
        the rooms are known: during a start everything waits for its turn)."""
        if not self.gate.is_open:
            return False
        room = self.registry.room(incoming.room_id)
        return room is not None and admit(room, incoming.sender, self.settings()) is Admission.IGNORE
