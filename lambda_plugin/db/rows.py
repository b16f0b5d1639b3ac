"""Row types: frozen, built from database records with ``from_row``."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from datetime import date, datetime, timezone
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
        """The row of a ``SELECT {columns}``: its values in field order. By position, not by
        name: a start builds thousands of rows, and lookups by name cost most of it."""
        # SQLite hands booleans back as 0/1: bool fields are made bool on both engines.
        values = zip(row, _bool_flags(cls), strict=True)  # a row of other columns raises
        return cls(*[bool(v) if flag else v for v, flag in values])


_BOOL_FLAGS: dict[type, tuple[bool, ...]] = {}


def _bool_flags(cls: type) -> tuple[bool, ...]:
    """Whether each field of a row type, in order, is a bool: read once per type."""
    flags = _BOOL_FLAGS.get(cls)
    if flags is None:
        flags = _BOOL_FLAGS[cls] = tuple(f.type == "bool" for f in fields(cls))
    return flags


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



@dataclass(frozen=True)
class UsageRow(Row):
    """What one user spent in one chat room on one UTC day."""

    user_id: str
    room_id: str
    day: str  # 'YYYY-MM-DD', UTC
    tokens_in: int
    tokens_out: int
    requests: int


def now_ms() -> int:
    return int(time.time() * 1000)


def utc_day(at: float | None = None) -> str:
    """The UTC day of ``at`` (a time.time(); now when None) as usage counts it: 'YYYY-MM-DD'."""
    moment = datetime.now(timezone.utc) if at is None else datetime.fromtimestamp(at, timezone.utc)
    return moment.date().isoformat()


def month_start(day: str) -> str:
    """The first day of the month ``day`` ('YYYY-MM-DD') is in."""
    return date.fromisoformat(day).replace(day=1).isoformat()


def chat_number(chat_id: str) -> int:
    """``C12`` -> 12; anything else -> 0."""
    if chat_id[:1] == "C" and chat_id[1:].isdigit():
        return int(chat_id[1:])
    return 0


@dataclass(frozen=True)
class LedgerRow(Row):
    """One user event's fate (see ``lambda_plugin.ledger``)."""

    event_id: str
    room_id: str
    sender: str
    kind: str
    state: str
    reason: str
    ts: int
    event: str | None
    answer_event: str | None
    updated_at: int
    replaces: str | None = None  # the message whose turn it re-answers (an edit, a 🔁)


@dataclass(frozen=True)
class FilePlaceRow(Row):
    """Where a user's file message landed in the workspace (its path relative to the root,
    as the agent was given it), for a later reply to that message."""

    room_id: str
    event_id: str
    path: str
    ts: int  # when it was written: rows age out with the ledger's
