"""The stage a room's queue hands each message to, in the room's turn: policy, then the
file, then the answer. Also what the room says when a message is cancelled or unknown."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .answering import Answerer
from .db import Store
from .gate import StartGate
from .intake import Incoming
from .matrix import HomeserverError
from .notices import Notices
from .part import Part
from .policy import Admission, RateLimiter, admit, refusal
from .queue import Outcome
from .registry import Registry
from .roomstate import matrix_to
from .usage import Quota

POINTER_EVERY_S = 3600  # at most one "your chats are in your Space" per room and hour


@dataclass(eq=False, kw_only=True)
class Conversation(Part):
    """The room queue's stage: each message through policy to the answer, in turn."""

    gate: StartGate
    store: Store
    registry: Registry
    answerer: Answerer
    notices: Notices
    quota: Quota

    def __post_init__(self) -> None:
        self.rate = RateLimiter(lambda: self.settings().requests_per_minute)
        self.pointer = SpacePointer(self.registry, self.notices)

    async def message(self, room_id: str, incoming: Incoming, retried: bool) -> Outcome:
        """Decides what a message gets, in the order the room's messages arrived."""
        if not await self.gate.wait():
            return Outcome.SKIPPED
        # Recorded first, whatever it gets: a message the plugin leaves alone (another
        # member's, an unmanaged room's) is not caught up again at every start either.
        if not retried and not await self.store.mark_handled(incoming.event_id, room_id):
            return Outcome.SKIPPED  # already handled (a redelivery, or caught up after a restart)
        settings = self.settings()
        room = self.registry.room(room_id)
        admission = admit(room, incoming.sender, settings)
        if admission is Admission.POINT:
            await self.pointer.point(room_id, incoming.sender)
        if room is None or admission is not Admission.TAKE:
            return Outcome.SKIPPED
        if reason := refusal(room, len(incoming.body), settings):
            await self.notices.say(room_id, reason[0], reply_to=incoming.event_id, **reason[1])
            return Outcome.SKIPPED
        if not self.rate.allow(incoming.sender):
            if self.rate.tell(incoming.sender):
                await self.notices.say(
                    room_id, "message.too_fast", per_minute=settings.requests_per_minute,
                    reply_to=incoming.event_id,
                )  # fmt: skip
            return Outcome.KEEP
        if over := await self.quota.refusal(incoming.sender):
            await self.notices.say(room_id, over[0], reply_to=incoming.event_id, **over[1])
            return Outcome.KEEP  # kept: !retry sends it after the reset or a raised limit
        try:
            answered = await self.answerer.answer(room_id, incoming)
        except HomeserverError as e:  # a send refused (too big, gone): said, and kept
            self.log.warning("Answering %s in %s failed: %s", incoming.event_id, room_id, e)
            await self.notices.say(room_id, "send.failed", reply_to=incoming.event_id)
            return Outcome.KEEP
        if answered is None:
            return Outcome.SKIPPED
        return Outcome.ANSWERED if answered else Outcome.KEEP

    async def cancelled(self, room_id: str, incoming: Incoming) -> None:
        await self.notices.say(room_id, "cancelled", reply_to=incoming.event_id)

    async def interrupted(self, incoming: Incoming) -> None:
        # Not answered after all: the next start's catch-up must see it as new.
        await self.store.unmark_handled(incoming.event_id)

    async def unknown_command(self, incoming: Incoming) -> None:
        """Says a command is unknown, in a chat room the plugin manages, to whom it would
        answer a message there (another bot's `!cmd` in a shared room gets nothing)."""
        if not await self.gate.wait():
            return
        if not await self.store.mark_handled(incoming.event_id, incoming.room_id):
            return
        room = self.registry.room(incoming.room_id)
        if room is not None and admit(room, incoming.sender, self.settings()) is Admission.TAKE:
            await self.notices.say(
                incoming.room_id, "command.unknown", command=f"!{incoming.command[:32]}",
                reply_to=incoming.event_id,
            )  # fmt: skip


class SpacePointer:
    """"Your chats are in your Space", said in a room that is not a chat: once a while."""

    def __init__(self, registry: Registry, notices: Notices) -> None:
        self.registry = registry
        self.notices = notices
        self._pointed: dict[str, float] = {}

    async def point(self, room_id: str, sender: str) -> None:
        user = self.registry.users.get(sender)
        if user is None or not user.space_id:
            return
        now = time.monotonic()
        if now - self._pointed.get(room_id, -POINTER_EVERY_S) < POINTER_EVERY_S:
            return
        self._pointed = {r: t for r, t in self._pointed.items() if now - t < POINTER_EVERY_S}
        self._pointed[room_id] = now
        link = matrix_to(user.space_id, self.notices.mx.server_name)
        await self.notices.say(room_id, "pointer", link=link)
