"""Row types: frozen, built from database records with ``from_row``."""

from __future__ import annotations

from dataclasses import dataclass

from asyncpg import Record


@dataclass(frozen=True)
class UserRow:
    user_id: str
    space_id: str | None
    next_chat_index: int
    created_at: int

    columns = "user_id, space_id, next_chat_index, created_at"

    @classmethod
    def from_row(cls, row: Record) -> UserRow:
        return cls(
            user_id=row["user_id"],
            space_id=row["space_id"],
            next_chat_index=row["next_chat_index"],
            created_at=row["created_at"],
        )


@dataclass(frozen=True)
class ChatRoomRow:
    room_id: str
    user_id: str
    chat_id: str
    name: str
    agent_id: str
    platform_chat_id: str
    archived: bool
    gone: bool
    created_at: int

    columns = (
        "room_id, user_id, chat_id, name, agent_id, platform_chat_id, archived, gone, created_at"
    )

    @property
    def chat_number(self) -> int:
        return chat_number(self.chat_id)

    @classmethod
    def from_row(cls, row: Record) -> ChatRoomRow:
        return cls(
            room_id=row["room_id"],
            user_id=row["user_id"],
            chat_id=row["chat_id"],
            name=row["name"],
            agent_id=row["agent_id"],
            platform_chat_id=row["platform_chat_id"],
            archived=bool(row["archived"]),
            gone=bool(row["gone"]),
            created_at=row["created_at"],
        )


@dataclass(frozen=True)
class SnapshotRow:
    user_id: str
    name: str
    agent_id: str
    platform_chat_id: str
    messages: str
    created_at: int

    columns = "user_id, name, agent_id, platform_chat_id, messages, created_at"

    @classmethod
    def from_row(cls, row: Record) -> SnapshotRow:
        return cls(
            user_id=row["user_id"],
            name=row["name"],
            agent_id=row["agent_id"],
            platform_chat_id=row["platform_chat_id"],
            messages=row["messages"],
            created_at=row["created_at"],
        )


@dataclass(frozen=True)
class HistoryRow:
    platform_chat_id: str
    seq: int
    role: str
    content: str
    created_at: int

    columns = "platform_chat_id, seq, role, content, created_at"

    @classmethod
    def from_row(cls, row: Record) -> HistoryRow:
        return cls(
            platform_chat_id=row["platform_chat_id"],
            seq=row["seq"],
            role=row["role"],
            content=row["content"],
            created_at=row["created_at"],
        )


def chat_number(chat_id: str) -> int:
    """``C12`` -> 12; anything else -> 0."""
    if chat_id[:1] == "C" and chat_id[1:].isdigit():
        return int(chat_id[1:])
    return 0
