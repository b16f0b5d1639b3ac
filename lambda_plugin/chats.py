"""The one writer of a chat: its database row and its marker in the room change together.

Every change is a read-modify-write of the row as it is now, under the room's lock: two
changes at once (a !clear and a rename in the client, !agent and !archive) apply one after
the other, and neither is lost. Reconciliation alone writes rows in bulk, and leaves any row
that changed while it read the rooms.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from weakref import WeakValueDictionary

from .db import ChatRoomRow
from .marker import MARKER_TYPE, Marker
from .matrix import Matrix
from .registry import Registry

Change = Callable[[ChatRoomRow], Awaitable[ChatRoomRow | None]]


@dataclass(eq=False)
class Chats:
    """Writes chats: row and marker together, one change at a time per room."""

    registry: Registry
    mx: Matrix
    log: logging.Logger
    # A room's lock lives while a change holds it or waits for it: no lock per room forever.
    _locks: WeakValueDictionary[str, asyncio.Lock] = field(default_factory=WeakValueDictionary)

    def lock(self, room_id: str) -> asyncio.Lock:
        lock = self._locks.get(room_id)
        if lock is None:
            lock = self._locks[room_id] = asyncio.Lock()
        return lock

    def marker(self, room: ChatRoomRow) -> Marker:
        user = self.registry.users.get(room.user_id)
        return Marker.for_chat(room, user.space_id if user else None)

    async def add(self, room: ChatRoomRow) -> None:
        """Records a chat room just made (its marker was part of the room's creation)."""
        async with self.lock(room.room_id):
            await self.registry.save_room(room)

    async def update(self, room_id: str, **changes: object) -> ChatRoomRow:
        """Changes fields of the chat as it is now; the marker follows when it differs."""

        async def apply(current: ChatRoomRow) -> ChatRoomRow:
            return replace(current, **changes)  # type: ignore[arg-type]

        updated = await self.change(room_id, apply)
        assert updated is not None
        return updated

    async def change(self, room_id: str, change: Change) -> ChatRoomRow | None:
        """Runs ``change`` on the chat's current row under the room's lock and writes what it
        returns (None: nothing to write). KeyError when the plugin has no such chat."""
        async with self.lock(room_id):
            current = self.registry.rooms[room_id]
            updated = await change(current)
            if updated is None or updated == current:
                return current
            # The room first: it is the truth a rebuild reads, so a failed write here leaves
            # both as they were, and a failed database write is repaired from the room.
            marker = self.marker(updated)
            if marker != self.marker(current):
                await self.mx.send_state(room_id, MARKER_TYPE, marker.content())
            await self.registry.save_room(updated)
            return updated
