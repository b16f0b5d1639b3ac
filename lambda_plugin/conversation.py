"""The stage a room's queue hands each message to, in the room's turn: policy, then the
file, then the answer. Also what the room says when a message is cancelled or unknown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from .answering import Answerer
from .gate import StartGate
from .intake import Incoming, Kind
from .ledger import Fate, Ledger
from .matrix import HomeserverError
from .notices import Notices
from .part import Part
from .policy import Admission, RateLimiter, admit, refusal
from .reanswer import Reanswers
from .registry import Registry
from .replies import Link
from .roomstate import matrix_to
from .spaces import LIST_BYTES, chat_listing
from .usage import Quota

POINTER_EVERY_S = 3600  # at most one pointer (or list of chats) per room and hour


@dataclass(eq=False, kw_only=True)
class Conversation(Part):
    """The room queue's stage: each message through policy to the answer, in turn; its
    fate recorded in the ledger."""

    gate: StartGate
    ledger: Ledger
    registry: Registry
    answerer: Answerer
    reanswers: Reanswers
    notices: Notices
    quota: Quota
    replay: Callable[[Incoming], Awaitable[None]]  # a missed command, to maubot's handlers
    command_names: Collection[str]

    def __post_init__(self) -> None:
        self.rate = RateLimiter(lambda: self.settings().requests_per_minute)
        self.pointer = SpacePointer(self.registry, self.notices)

    async def message(self, room_id: str, incoming: Incoming, retried: bool) -> None:
        """Decides what a message gets, in the order the room's messages arrived, and
        records it: one fate per message, whatever fails."""
        if not await self.gate.wait():
            return
        if not await self.ledger.claim(incoming, retried):
            return  # done already (a redelivery, a duplicate of the catch-up), or kept
        try:
            fate, reason = await self._decide(room_id, incoming)
        except asyncio.CancelledError:
            self.ledger.release(incoming.event_id)  # !cancel keeps it; a stop leaves it
            raise
        except Exception:
            await self.ledger.keep(incoming, "error")  # logged by the queue; !retry tries it
            raise
        if fate is Fate.KEPT:
            await self._keep(room_id, incoming, reason)
        else:
            await self.ledger.end(incoming.event_id, fate, reason)

    async def _decide(self, room_id: str, incoming: Incoming) -> tuple[Fate, str]:
        settings = self.settings()
        room = self.registry.room(room_id)
        admission = admit(room, incoming.sender, settings)
        if admission is Admission.POINT and incoming.kind is Kind.MESSAGE:  # not for a 🔁
            await self.pointer.point(room_id, incoming.sender)
        if room is None or admission is not Admission.TAKE:
            return Fate.LEFT, admission.value
        if incoming.is_reanswer:  # an edit, a 🔁
            resolved = await self.reanswers.resolve(room, incoming)
            if isinstance(resolved, tuple):
                return resolved
            incoming = resolved
        if reason := refusal(room, len(incoming.body), settings):
            await self.notices.say(room_id, reason[0], reply_to=incoming.event_id, **reason[1])
            return Fate.REFUSED, reason[0]
        if not self.rate.allow(incoming.sender):
            if self.rate.tell(incoming.sender):
                await self.notices.note(
                    room_id, "message.too_fast", per_minute=settings.requests_per_minute,
                    reply_to=incoming.event_id,
                )  # fmt: skip
            return Fate.KEPT, "rate"
        with self.quota.hold(incoming.sender, len(incoming.body)) as held:
            if over := await self.quota.refusal(incoming.sender, held):
                await self.notices.note(room_id, over[0], reply_to=incoming.event_id, **over[1])
                return Fate.KEPT, "quota"  # !retry sends it after the reset or a raised limit
            return await self._answer(room_id, incoming)

    async def _answer(self, room_id: str, incoming: Incoming) -> tuple[Fate, str]:
        try:
            return await self.answerer.answer(room_id, incoming)
        except HomeserverError as e:  # a send refused (too big, gone), or an outage outlasted
            self.log.warning("Answering %s in %s failed: %s", incoming.event_id, room_id, e)
            with contextlib.suppress(HomeserverError):
                await self.notices.note(room_id, "send.failed", reply_to=incoming.event_id)
            return Fate.KEPT, "send"

    async def _keep(self, room_id: str, incoming: Incoming, reason: str) -> bool:
        """Keeps the message for !retry (False when it had an end: nothing to keep)."""
        dropped = await self.ledger.keep(incoming, reason)
        for old in dropped or ():
            max_kept = self.settings().max_kept_per_room
            await self.notices.say(room_id, "kept.dropped", max=max_kept, reply_to=old.event_id)
        return dropped is not None

    async def cancelled(self, room_id: str, incoming: Incoming) -> None:
        """``!cancel`` stopped it: kept, so ``!retry`` sends it again; one whose answer is
        in the room already (the cancel came as its end was written), or that had an end
        before this delivery of it (a duplicate), stays as it is."""
        if self.ledger.was_delivered(incoming.event_id):
            return
        if await self._keep(room_id, incoming, "cancelled"):
            await self.notices.note(room_id, "cancelled", reply_to=incoming.event_id)

    def supersedes(self, edit: Incoming, earlier: Incoming) -> bool:
        """Whether the room owner's edit replaces ``earlier`` (its original, or an earlier
        edit of it) before that is answered: anyone else's changes nothing, and a file is
        never replaced by text (its edit is refused in its turn, as ``reanswers`` decides)."""
        room = self.registry.room(edit.room_id)
        return (
            room is not None and edit.sender == room.user_id == earlier.sender
            and earlier.kind is Kind.MESSAGE and earlier.file is None
            and earlier.event_id != edit.event_id and earlier.turn == edit.replaces
        )  # fmt: skip

    def superseded(self, incoming: Incoming) -> None:
        if not self.ledger.was_delivered(incoming.event_id):  # answered as it was stopped
            self.ledger.superseded(incoming)

    def stopped(self, incoming: Incoming) -> None:
        # Left unfinished in the ledger: the next start answers it, once.
        self.ledger.release(incoming.event_id)

    async def command(self, incoming: Incoming) -> None:
        """A command no handler of maubot's got: a missed one is replayed, in its turn;
        an unknown one is answered."""
        if incoming.command in self.command_names:
            await self.replay(incoming)
        else:
            await self.unknown_command(incoming)

    async def unknown_command(self, incoming: Incoming) -> None:
        """Says a command is unknown, in a chat room the plugin manages, to whom it would
        answer a message there (another bot's `!cmd` in a shared room gets nothing)."""
        if not await self.gate.wait() or not await self.ledger.claim(incoming):
            return
        room = self.registry.room(incoming.room_id)
        if room is None or admit(room, incoming.sender, self.settings()) is not Admission.TAKE:
            if room is None and self.registry.spaces.get(incoming.room_id) == incoming.sender:
                await self.pointer.point(incoming.room_id, incoming.sender)  # their chats
            await self.ledger.end(incoming.event_id, Fate.LEFT, "unknown command")
            return
        try:
            await self.notices.say(
                incoming.room_id, "command.unknown", command=f"!{incoming.command[:32]}",
                reply_to=incoming.event_id,
            )  # fmt: skip
        finally:
            await self.ledger.end(incoming.event_id, Fate.ANSWERED, "unknown command")


class SpacePointer:
    """Said in a room that is not a chat, once a while per room: in the sender's own Space,
    the list of their chats (as ``!chats`` shows it); anywhere else, a link to their Space.
    Another member of someone's Space is told nothing."""

    def __init__(self, registry: Registry, notices: Notices) -> None:
        self.registry = registry
        self.notices = notices
        self._pointed: dict[str, float] = {}

    async def point(self, room_id: str, sender: str) -> None:
        user = self.registry.users.get(sender)
        if user is None or not user.space_id:
            return
        owner = self.registry.spaces.get(room_id)
        if (owner is not None and owner != sender) or not self._due(room_id):
            return
        server = self.notices.mx.server_name
        if room_id == user.space_id:
            rooms = self.registry.active_rooms_of(sender)
            markdown, plain = chat_listing(self.notices, rooms, room_id, LIST_BYTES)
            await self.notices.send(room_id, markdown, plain=plain)
            return
        link = Link(self.notices.text("space.link"), matrix_to(user.space_id, server))
        await self.notices.say(room_id, "pointer", link=link)

    def _due(self, room_id: str) -> bool:
        """Whether the room may be told now (and, if so, it counts as told)."""
        now = time.monotonic()
        if now - self._pointed.get(room_id, -POINTER_EVERY_S) < POINTER_EVERY_S:
            return False
        self._pointed = {r: t for r, t in self._pointed.items() if now - t < POINTER_EVERY_S}
        self._pointed[room_id] = now
        return True
