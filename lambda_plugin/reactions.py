"""Reactions that steer an answer: 🛑 on a running answer (or on the message it answers)
stops it, as ``!cancel`` does: the message is kept for ``!retry``. A 🔁 is a message of
its own to intake (answered in its turn, see reanswer.py): it is queued from here.

Only the room's owner steers it; anyone else's reaction changes nothing. A reaction is
judged by what it points at: the bot's event naming the message under way (its stream's
first event, ``intake.ANSWERING``) or that message itself. Reactions sent while the plugin
was stopped stop nothing: nothing was running.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from maubot.handlers import event
from mautrix.types import EventType, ReactionEvent

from .gate import StartGate
from .intake import ANSWERING, ANSWERS, STOP, Incoming, Kind, as_json, classify, reaction_is
from .matrix import HomeserverError, Matrix
from .part import Part
from .queue import RoomQueues
from .registry import Registry


def stop_key(key: Any) -> bool:
    return reaction_is(key, STOP)


@dataclass(eq=False, kw_only=True)
class Reactions(Part):
    gate: StartGate
    mx: Matrix
    registry: Registry
    queues: RoomQueues
    route: Callable[[Incoming], Awaitable[None]]  # a 🔁 goes the live way of messages

    @event.on(EventType.REACTION)
    async def on_reaction(self, evt: ReactionEvent) -> None:
        regenerate = classify(as_json(evt), self.mx.user_id)
        if regenerate.kind is Kind.REGENERATE:
            # Queued before route's first await: in the order maubot dispatched; a full
            # queue is told so, as for a message.
            await self.route(regenerate)
            return
        if not await self.gate.wait():
            return
        relates = getattr(evt.content, "relates_to", None)
        target = getattr(relates, "event_id", None)
        if not stop_key(getattr(relates, "key", None)) or not isinstance(target, str):
            return
        await self.stop(evt.room_id, evt.sender, target)

    async def stop(self, room_id: str, sender: str, target: str) -> bool:
        """Stops the room's running answer when the owner's 🛑 points at it."""
        room = self.registry.room(room_id)
        worker = self.queues.workers.get(room_id)
        running = getattr(worker, "current_item", None) if worker is not None else None
        if room is None or sender != room.user_id or running is None:
            return False
        running_ids, again = _running_ids(running), running.is_reanswer
        if target not in running_ids and await self._answering(room_id, target, again) not in running_ids:
            return False
        stopped = self.queues.cancel(room_id)
        if stopped:
            self.log.info("Stopped the answer to %s in %s on a reaction", running.event_id, room_id)
        return stopped

    async def _answering(self, room_id: str, event_id: str, finished: bool) -> str | None:
        """The message the bot's event ``event_id`` is an unfinished answer to, if it is one
        (``finished``: or the answer, a re-answer streaming into it)."""
        try:
            found = await self.mx.opened_event(room_id, event_id)
        except HomeserverError as e:
            self.log.debug("Could not read %s reacted to in %s: %s", event_id, room_id, e)
            return None
        content = found.get("content")
        if found.get("sender") != self.mx.user_id or not isinstance(content, dict):
            return None
        # A re-answer streams into the finished answer, which names its message as answered.
        answering = content.get(ANSWERING, content.get(ANSWERS) if finished else None)
        return answering if isinstance(answering, str) else None


def _running_ids(running: Incoming) -> set[str]:
    """What a 🛑 may point at to stop ``running``: the message itself; for a re-answer also
    the message it answers again and, for a 🔁, the answer reacted to (whose content names
    the message: a 🛑 on it matches through ``_answering``)."""
    ids = {running.event_id}
    if running.is_reanswer:
        ids |= {running.turn, running.regenerates} - {""}
    return ids
