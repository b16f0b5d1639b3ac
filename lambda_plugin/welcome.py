"""The welcome of a chat room, said when its owner arrives.

Sent when the owner's join is seen, not when the room is made: a user on another homeserver
gets the room's events only from their join on (their /sync starts there), so a welcome sent
before it never notifies and shows only if the client pages back. Once per room: the welcome
carries ``WELCOMED``, and a room whose recent events hold one (a rejoin, a restart) gets no
second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .db import ChatRoomRow
from .matrix import HomeserverError, Matrix
from .notices import Notices
from .part import Part
from .replies import notice_content

# The field of the welcome notice (its value: the chat's id).
WELCOMED = "ai.lambda.matrix.welcome"
RECENT_EVENTS = 50  # how far back a room is read for an earlier welcome
ROOMS_REMEMBERED = 10_000


@dataclass(eq=False, kw_only=True)
class Welcomes(Part):
    mx: Matrix
    notices: Notices
    # Rooms welcomed (or being welcomed) by this process, oldest first.
    _done: dict[str, None] = field(default_factory=dict)

    async def owner_joined(self, room: ChatRoomRow) -> None:
        """Welcomes the owner who just joined ``room``, unless the room has had a welcome."""
        if room.room_id in self._done:
            return
        self._done[room.room_id] = None
        while len(self._done) > ROOMS_REMEMBERED:
            del self._done[next(iter(self._done))]
        if await self._welcomed_before(room.room_id):
            return
        body = self.notices.text("welcome", name=room.name, agent=room.agent_id)
        await self.mx.send(room.room_id, {**notice_content(body), WELCOMED: room.chat_id})
        self.log.info("Welcomed %s in %s (%s)", room.user_id, room.room_id, room.chat_id)

    async def _welcomed_before(self, room_id: str) -> bool:
        try:
            recent = await self.mx.recent(room_id, RECENT_EVENTS)
        except HomeserverError as e:
            # Unknown: a welcome twice is better than none.
            self.log.warning("Could not read %s for an earlier welcome: %s", room_id, e)
            return False
        await self.mx.crypto.open_all({room_id: recent})
        return any(
            event.get("sender") == self.mx.user_id
            and isinstance(event.get("content"), dict)
            and WELCOMED in event["content"]
            for event in recent
        )
