"""Live delivery: each room message is classified and queued in its room, in the order
maubot dispatched it. Known commands are maubot's command handlers' to answer."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from maubot import MessageEvent
from maubot.handlers import event
from mautrix.types import EventType

from .conversation import Conversation
from .gate import StartGate
from .intake import Incoming, Kind, as_json, classify
from .matrix import Matrix
from .queue import RoomQueues, filled_slot


@dataclass(eq=False)
class Router:
    queues: RoomQueues
    conversation: Conversation
    gate: StartGate
    mx: Matrix
    command_names: Collection[str]

    @event.on(EventType.ROOM_MESSAGE)
    async def on_message(self, evt: MessageEvent) -> None:
        await self.route(classify(as_json(evt), self.mx.user_id))

    async def route(self, incoming: Incoming) -> None:
        """Queues a message or an unknown command in its room; queued before the first
        await, since handlers run as unordered tasks and the room's order must hold."""
        if incoming.kind is Kind.MESSAGE:
            worker = self.queues.worker(incoming.room_id)
            waits = worker.busy
            worker.push(incoming)
            if waits and self.gate.is_open:
                # It has to wait its turn: a read receipt shows the user it arrived.
                await self.mx.receipt(incoming.room_id, incoming.event_id)
        elif incoming.kind is Kind.COMMAND and incoming.command not in self.command_names:
            answer = self.conversation.unknown_command
            self.queues.worker(incoming.room_id).push(filled_slot(lambda: answer(incoming)))
