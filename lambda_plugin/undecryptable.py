"""Messages the bot cannot decrypt: never silent.

maubot decrypts what it can before dispatching; what it cannot reaches this handler still
encrypted. The keys often arrive a moment later (another to-device message): the event is
tried again for a while and, once open, goes the live way (the handled log keeps it
answered once, where maubot dispatched it too). If the keys never come, the sender gets one
notice per device and session, and the log one line.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from maubot.handlers import event
from mautrix.types import EncryptedEvent, EventType

from .catchup import CatchUp
from .matrix import Matrix
from .notices import Notices
from .part import Part

RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # about 15 s for late keys, then the notice
TOLD_REMEMBERED = 1000

@dataclass(eq=False, kw_only=True)
class Undecryptable(Part):
    """Retries what maubot could not decrypt; tells the sender when it stays shut."""

    mx: Matrix
    notices: Notices
    catch_up: CatchUp  # an opened event goes the live way through it
    _told: dict[tuple[str, ...], None] = field(default_factory=dict)

    @event.on(EventType.ROOM_ENCRYPTED)
    async def on_encrypted(self, evt: EncryptedEvent) -> None:
        await self.attempt(evt.room_id, evt.sender, evt.serialize())

    async def attempt(self, room_id: str, sender: str, raw: dict[str, Any]) -> None:
        """Tries an encrypted event again while its keys may still arrive: handled the live
        way once open, else the sender is told (live events, and what a start read)."""
        if sender == self.mx.user_id or not self.mx.crypto.available:
            return
        for delay in (0.0, *RETRY_DELAYS_S):
            await asyncio.sleep(delay)
            opened = await self.mx.crypto.open(room_id, raw)
            if opened is not None:
                await self.catch_up.hand_over(room_id, opened)
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
        key = (room_id, sender, device, session)
        if key in self._told or sender not in self.settings().allowed_users:
            return
        self._told[key] = None
        while len(self._told) > TOLD_REMEMBERED:
            del self._told[next(iter(self._told))]
        await self.notices.say(room_id, "encryption.undecryptable")
