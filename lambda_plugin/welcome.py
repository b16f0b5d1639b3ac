"""The welcome of a chat room, said when its owner arrives.

Sent when the owner's join is seen, not when the room is made: a user on another homeserver
gets the room's events only from their join on (their /sync starts there), so a welcome sent
before it never notifies and shows only if the client pages back. Once per room: a room
where the bot has said anything lately (a welcome, an answer: a rejoin, a restart, a room
made before this version) gets none; the bot's events are told by their sender, so this
holds in encrypted rooms without their keys. An owner who joined while the plugin was
stopped is welcomed at the start (rooms made within the catch-up window).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .db import ChatRoomRow
from .matrix import HomeserverError, Matrix
from .notices import Notices
from .part import Part
from .replies import Verbatim, notice_content

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
        try:
            if await self._spoken_in(room.room_id):
                return
            values: dict[str, object] = {"name": Verbatim(room.name), "agent": room.agent_id}
            body = self.notices.text("welcome", **values)
            plain = self.notices.plain("welcome", **values)
            content = notice_content(body, plain=plain)
            await self.mx.send(room.room_id, {**content, WELCOMED: room.chat_id})
        except Exception as e:  # a later join tries again
            self._done.pop(room.room_id, None)
            self.log.warning("Welcoming %s in %s failed: %s", room.user_id, room.room_id, e)
            return
        self.log.info("Welcomed %s in %s (%s)", room.user_id, room.room_id, room.chat_id)

    async def _spoken_in(self, room_id: str) -> bool:
        """Whether the bot said anything among the room's recent events."""
        try:
            recent = await self.mx.recent(room_id, RECENT_EVENTS)
        except HomeserverError as e:
            # Unknown: a welcome twice is better than none.
            self.log.warning("Could not read %s for an earlier welcome: %s", room_id, e)
            return False
        return any(
            event.get("sender") == self.mx.user_id
            and event.get("type") in ("m.room.message", "m.room.encrypted")
            for event in recent
        )

    async def joined_meanwhile(self, rooms: list[ChatRoomRow], window_s: float) -> None:
        """Welcomes the owners of chats made within ``window_s`` who joined while the
        plugin was not listening (a start): their join reached no handler."""
        since_ms = int((time.time() - window_s) * 1000)
        for room in rooms:
            if room.gone or room.archived or room.created_at < since_ms:
                continue
            try:
                joined = await self.mx.membership(room.room_id, room.user_id) == "join"
            except HomeserverError as e:
                self.log.warning("Could not read who joined %s: %s", room.room_id, e)
                continue
            if joined:
                await self.owner_joined(room)
