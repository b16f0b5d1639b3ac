"""Row types: frozen, built from database records with ``from_row``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, TypeVar

from asyncpg import Record

RowT = TypeVar("RowT", bound="Row")


class Row:
    """A table row; ``columns`` lists its columns, named as its fields."""

    columns: ClassVar[str]

    @classmethod
    def from_row(cls: type[RowT], row: Record) -> RowT:
        # SQLite hands booleans back as 0/1: bool fields are made bool on both engines.
        return cls(
            **{
                f.name: bool(row[f.name]) if f.type == "bool" else row[f.name]
                for f in fields(cls)  # type: ignore[arg-type]
            }
        )


@dataclass(frozen=True)
class UserRow(Row):
    user_id: str
    space_id: str | None
    next_chat_index: int
    created_at: int

    columns: ClassVar[str] = "user_id, space_id, next_chat_index, created_at"


@dataclass(frozen=True)
class ChatRoomRow(Row):
    room_id: str
    user_id: str
    chat_id: str
    name: str
    agent_id: str
    platform_chat_id: str
    archived: bool
    gone: bool
    created_at: int

    columns: ClassVar[str] = (
        "room_id, user_id, chat_id, name, agent_id, platform_chat_id, archived, gone, created_at"
    )

    @property
    def chat_number(self) -> int:
        return chat_number(self.chat_id)


@dataclass(frozen=True)
class SnapshotRow(Row):
    user_id: str
    name: str
    agent_id: str
    platform_chat_id: str
    messages: str
    created_at: int

    columns: ClassVar[str] = "user_id, name, agent_id, platform_chat_id, messages, created_at"


@dataclass(frozen=True)
class HistoryRow(Row):
    platform_chat_id: str
    seq: int
    role: str
    content: str
    created_at: int

    columns: ClassVar[str] = "platform_chat_id, seq, role, content, created_at"


def chat_number(chat_id: str) -> int:
    """``C12`` -> 12; anything else -> 0."""
    if chat_id[:1] == "C" and chat_id[1:].isdigit():
        return int(chat_id[1:])
    return 0
