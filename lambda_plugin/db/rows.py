"""Row types: frozen, built from database records with ``from_row``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypeVar

from asyncpg import Record

RowT = TypeVar("RowT", bound="Row")


class _Columns:
    """A row type's column list for SQL, read off its fields: written once, in order."""

    def __get__(self, row: object, cls: type) -> str:
        return ", ".join(f.name for f in fields(cls))


class Row:
    """A table row; ``columns`` lists its columns, named as its fields."""

    columns = _Columns()

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



@dataclass(frozen=True)
class HistoryRow(Row):
    platform_chat_id: str
    seq: int
    role: str
    content: str
    created_at: int



def chat_number(chat_id: str) -> int:
    """``C12`` -> 12; anything else -> 0."""
    if chat_id[:1] == "C" and chat_id[1:].isdigit():
        return int(chat_id[1:])
    return 0
