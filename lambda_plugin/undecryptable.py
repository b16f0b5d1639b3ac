"""Messages the bot cannot decrypt: never silent.

maubot decrypts what it can before dispatching; what it cannot reaches this handler still
encrypted. The keys often arrive a moment later (another to-device message): the event is
tried again for a while and, once open, goes the live way (the ledger keeps it answered
once, where maubot dispatched it too). If the keys never come, the sender gets one
notice per device and session, and the log one line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from maubot.handlers import event
from mautrix.types import EncryptedEvent, EventType

from .intake import Incoming, Kind, classify
from .matrix import Matrix
from .notices import Notices
from .part import Part
from .policy import Admission, admit
from .registry import Registry

RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # about 15 s for late keys, then the notice
TELL_EVERY_S = 3600
TOLD_REMEMBERED = 1000

@dataclass(eq=False, kw_only=True)
class Undecryptable(Part):
    """Retries what maubot could not decrypt; tells the sender when it stays shut."""

    mx: Matrix
    notices: Notices
    enqueue: Callable[[Incoming, bool], object]  # an opened event goes the live way
    registry: Registry
    _told: dict[tuple[str, ...], float] = field(default_factory=dict)

    def _managed(self, room_id: str, sender: str) -> bool:
        """A chat room of the plugin, and a sender whose messages it would answer there."""
        room = self.registry.room(room_id)
        settings = self.settings()
        return room is not None and admit(room, sender, settings) is Admission.TAKE

    @event.on(EventType.ROOM_ENCRYPTED)
    async def on_encrypted(self, evt: EncryptedEvent) -> None:
        # Every encrypted event reaches this handler next to maubot's own decryption: one
        # that opens at once was opened (and dispatched) by maubot too, and is left to it.
        raw = evt.serialize()
        if evt.sender == self.mx.user_id or await self.mx.crypto.open(evt.room_id, raw):
            return
        await self.attempt(evt.room_id, evt.sender, raw)

    async def attempt(self, room_id: str, sender: str, raw: dict[str, Any]) -> None:
        """Tries an encrypted event again while its keys may still arrive: handled the live
        way once open, else the sender is told (live events, and what a start read)."""
        if sender == self.mx.user_id or not self.mx.crypto.available:
            return
        for delay in RETRY_DELAYS_S:
            await asyncio.sleep(delay)
            opened = await self.mx.crypto.open(room_id, raw)
            if opened is not None:
                found = classify({**opened, "room_id": room_id}, self.mx.user_id)
                if found.kind is not Kind.IGNORED:
                    self.enqueue(found, True)
                return
        await self._tell(room_id, sender, raw)

    async def _tell(self, room_id: str, sender: str, raw: dict[str, Any]) -> None:
        """One notice per room, sender, device and session; one log line each time."""
        content = raw.get("content")
        content = content if isinstance(content, dict) else {}
        device, session = str(content.get("device_id")), str(content.get("session_id"))
        self.log.warning(
            "Can't decrypt %s from %s (device %s, session %s) in %s: its keys did not arrive",
            raw.get("event_id"), sender, device, session, room_id,
        )  # fmt: skip
        # Told once per device and session, and at most once an hour per room and sender
        # (the session ids are the sender's to make up), only in the plugin's chat rooms.
        now = time.monotonic()
        key, room_key = (room_id, sender, device, session), (room_id, sender)
        recently = now - self._told.get(room_key, -TELL_EVERY_S) < TELL_EVERY_S
        if key in self._told or recently or not self._managed(room_id, sender):
            return
        self._told[key] = self._told[room_key] = now
        while len(self._told) > TOLD_REMEMBERED:
            del self._told[next(iter(self._told))]
        await self.notices.say(room_id, "encryption.undecryptable")
