"""What the plugin knows of users and chat rooms: in memory, written through to the database.

Routing looks rooms up here on every message, so no message costs a database or homeserver
round trip just to learn where it goes.
"""

from __future__ import annotations

from .db import ChatRoomRow, Store, UserRow


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.users: dict[str, UserRow] = {}
        self.rooms: dict[str, ChatRoomRow] = {}
        self.spaces: dict[str, str] = {}  # space id -> owner

    async def load(self) -> None:
        users = await self.store.all_users()
        rooms = await self.store.all_rooms()
        self.users = {u.user_id: u for u in users}
        self.rooms = {r.room_id: r for r in rooms}
        self.spaces = {u.space_id: u.user_id for u in users if u.space_id}

    def room(self, room_id: str) -> ChatRoomRow | None:
        return self.rooms.get(room_id)

    def rooms_of(self, user_id: str) -> list[ChatRoomRow]:
        rooms = [r for r in self.rooms.values() if r.user_id == user_id]
        return sorted(rooms, key=lambda r: (r.chat_number, r.created_at))

    def active_rooms_of(self, user_id: str) -> list[ChatRoomRow]:
        return [r for r in self.rooms_of(user_id) if not r.archived and not r.gone]

    async def refresh_user(self, user_id: str) -> UserRow | None:
        user = await self.store.get_user(user_id)
        if user is None:
            self.users.pop(user_id, None)
        else:
            self.users[user_id] = user
            if user.space_id:
                self.spaces[user.space_id] = user_id
        return user

    async def ensure_user(self, user_id: str) -> UserRow:
        user = await self.store.ensure_user(user_id)
        self.users[user_id] = user
        return user

    async def set_space(self, user_id: str, space_id: str) -> None:
        await self.store.set_space(user_id, space_id)
        await self.refresh_user(user_id)

    async def save_room(self, room: ChatRoomRow) -> None:
        """Writes a chat's row through; only ``Chats`` calls this (it keeps the marker too)."""
        await self.store.upsert_room(room)
        self.rooms[room.room_id] = room
        await self.refresh_user(room.user_id)

