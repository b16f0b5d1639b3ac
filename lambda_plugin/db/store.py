"""All SQL of the plugin, one method per query, identical on SQLite and PostgreSQL (bar the
UTF-8 size of a text, ``history.octets``); the history's own is in ``history.py``."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
from asyncpg import Record
from mautrix.util.async_db import Connection, Database

from .history import HistoryBounds, HistorySize, HistoryTable, octets
from .rows import ChatRoomRow, HistoryRow, SnapshotRow, UsageRow, UserRow, now_ms

# Raised on a constraint violation (unique, primary or foreign key, not null), whichever
# engine runs: SQLite raises one IntegrityError for all of them, so PostgreSQL's counterpart
# is their common base (a ForeignKeyViolationError is no UniqueViolationError).
UNIQUE_VIOLATION = (asyncpg.IntegrityConstraintViolationError, sqlite3.IntegrityError)
# What a call raises while the database is unreachable (restarting, failing over, locked):
# a fault to wait out, not a reason to drop a message.
DATABASE_DOWN = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
    sqlite3.OperationalError,  # only when locked, busy or unreachable: see is_outage
)
# What an OperationalError of SQLite says when it is an outage, not a mistake in the SQL.
_SQLITE_OUTAGE = ("locked", "busy", "unable to open", "disk i/o")


# Raised before a statement reached the database (it never ran): safe to repeat any write.
NEVER_SENT = (
    ConnectionRefusedError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
)
# Mistakes of the client's own (a wrong argument), not outages, though InterfaceErrors.
_NOT_OUTAGES = (asyncpg.exceptions._base.DataError, asyncpg.exceptions._base.ClientConfigurationError)


def is_outage(error: BaseException, repeatable: bool = True) -> bool:
    """Whether ``error`` means the database is unreachable for now (worth waiting out).
    A write that is not ``repeatable`` (an increment) is waited out only when the error
    shows it never ran: a connection lost mid-statement may have committed it."""
    if isinstance(error, sqlite3.OperationalError):
        return any(word in str(error).lower() for word in _SQLITE_OUTAGE)
    if isinstance(error, _NOT_OUTAGES) or not isinstance(error, DATABASE_DOWN):
        return False
    return repeatable or isinstance(error, NEVER_SENT)
# Every table of the plugin, in an order rows can be deleted in.
TABLES = (
    "chat_room", "lambda_user", "snapshot", "history", "ledger", "usage", "plugin_state",
    "file_place",
)  # fmt: skip
# Sums of a usage query: SUM is NULL over no rows, and NUMERIC on PostgreSQL.
USAGE_SUMS = (
    "COALESCE(SUM(tokens_in), 0) AS tokens_in, COALESCE(SUM(tokens_out), 0) AS tokens_out,"
    " COALESCE(SUM(requests), 0) AS requests"
)

# (tokens_in, tokens_out, requests)
Totals = tuple[int, int, int]
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
_log = logging.getLogger("maubot.lambda.db")
OUTAGE_MAX_WAIT_S = 4.0  # between two tries while the database is unreachable


async def waiting_out(
    call: Callable[[], Awaitable[T]], wait_s: float, what: str, repeatable: bool = True
) -> T:
    """``call()``, tried again with backoff while the database is unreachable, for up to
    ``wait_s`` seconds; then the last error is raised (see ``is_outage``)."""
    deadline = time.monotonic() + wait_s
    delay = 0.5
    while True:
        try:
            return await call()
        except DATABASE_DOWN as e:
            if not is_outage(e, repeatable) or time.monotonic() + delay > deadline:
                raise
            _log.warning("The database is unreachable (%r) in %s; again in %.1fs", e, what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, OUTAGE_MAX_WAIT_S)


def _waits_out(method: F, repeatable: bool = True) -> F:
    """A Store method on a message's way: a database outage is waited out."""

    @functools.wraps(method)
    async def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        return await waiting_out(
            lambda: method(self, *args, **kwargs), self.outage_s(), method.__name__, repeatable
        )

    return wrapper  # type: ignore[return-value]


def _waits_out_once(method: F) -> F:
    """The same for a write that must not run twice (an increment)."""
    return _waits_out(method, repeatable=False)


class Store:
    def __init__(
        self,
        db: Database,
        outage_s: Callable[[], float] = lambda: 0.0,
        history_bounds: Callable[[], HistoryBounds] = HistoryBounds,
    ) -> None:
        self.db = db
        self.outage_s = outage_s  # how long a database outage is waited out
        # One plugin instance owns its database: a conversation's appends are serialised by
        # a process-local lock of that conversation (see HistoryTable).
        self.histories = HistoryTable(db, history_bounds)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        """A connection in a transaction: the writes in it hold together or not at all."""
        conn: Connection  # mautrix leaves the connection's type to be inferred, and it can't be
        async with self.db.acquire() as conn, conn.transaction():
            yield conn

    # users

    async def get_user(self, user_id: str) -> UserRow | None:
        row = await self.db.fetchrow(
            f"SELECT {UserRow.columns} FROM lambda_user WHERE user_id=$1", user_id
        )
        return UserRow.from_row(row) if row else None

    async def all_users(self) -> list[UserRow]:
        rows = await self.db.fetch(f"SELECT {UserRow.columns} FROM lambda_user")
        return [UserRow.from_row(row) for row in rows]

    async def ensure_user(self, user_id: str) -> UserRow:
        await self.db.execute(
            "INSERT INTO lambda_user (user_id, space_id, next_chat_index, created_at)"
            " VALUES ($1, NULL, 1, $2) ON CONFLICT (user_id) DO NOTHING",
            user_id,
            now_ms(),
        )
        user = await self.get_user(user_id)
        assert user is not None
        return user

    async def upsert_users(self, users: list[UserRow]) -> None:
        """Writes users in one transaction; next_chat_index only ever grows."""
        if not users:
            return
        async with self._transaction() as conn:
            await conn.executemany(
                "INSERT INTO lambda_user (user_id, space_id, next_chat_index, created_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (user_id) DO UPDATE SET"
                " space_id = excluded.space_id,"
                " next_chat_index = CASE"
                " WHEN excluded.next_chat_index > lambda_user.next_chat_index"
                " THEN excluded.next_chat_index ELSE lambda_user.next_chat_index END",
                [(u.user_id, u.space_id, u.next_chat_index, u.created_at) for u in users],
            )

    async def set_space(self, user_id: str, space_id: str) -> None:
        await self.db.execute(
            "UPDATE lambda_user SET space_id=$2 WHERE user_id=$1", user_id, space_id
        )

    async def take_chat_index(self, user_id: str) -> int:
        """Reserves the user's next chat number (C<n>) and returns it, atomically."""
        taken = await self.db.fetchval(
            "UPDATE lambda_user SET next_chat_index = next_chat_index + 1"
            " WHERE user_id=$1 RETURNING next_chat_index - 1",
            user_id,
        )
        if taken is None:
            raise KeyError(user_id)
        return int(taken)

    # chat rooms

    async def get_room(self, room_id: str) -> ChatRoomRow | None:
        row = await self.db.fetchrow(
            f"SELECT {ChatRoomRow.columns} FROM chat_room WHERE room_id=$1", room_id
        )
        return ChatRoomRow.from_row(row) if row else None

    async def rooms_of(self, user_id: str) -> list[ChatRoomRow]:
        rows = await self.db.fetch(
            f"SELECT {ChatRoomRow.columns} FROM chat_room WHERE user_id=$1 ORDER BY created_at",
            user_id,
        )
        return sorted((ChatRoomRow.from_row(r) for r in rows), key=lambda r: r.chat_number)

    async def all_rooms(self) -> list[ChatRoomRow]:
        rows = await self.db.fetch(f"SELECT {ChatRoomRow.columns} FROM chat_room")
        return [ChatRoomRow.from_row(row) for row in rows]

    async def upsert_room(self, room: ChatRoomRow) -> None:
        """Writes a chat room and keeps the owner's counter past its chat number."""
        await self.upsert_rooms([room])

    async def upsert_rooms(self, rooms: list[ChatRoomRow]) -> None:
        """Writes chat rooms in one transaction (all or none), each owner's counter kept
        past their chat numbers."""
        if not rooms:
            return
        async with self._transaction() as conn:
            await conn.executemany(
                f"INSERT INTO chat_room ({ChatRoomRow.columns})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                " ON CONFLICT (room_id) DO UPDATE SET"
                " user_id = excluded.user_id, chat_id = excluded.chat_id,"
                " name = excluded.name, agent_id = excluded.agent_id,"
                " platform_chat_id = excluded.platform_chat_id,"
                " archived = excluded.archived, gone = excluded.gone",
                [
                    (
                        r.room_id,
                        r.user_id,
                        r.chat_id,
                        r.name,
                        r.agent_id,
                        r.platform_chat_id,
                        r.archived,
                        r.gone,
                        r.created_at,
                    )
                    for r in rooms
                ],
            )
            await conn.executemany(
                "UPDATE lambda_user SET next_chat_index=$2"
                " WHERE user_id=$1 AND next_chat_index < $2",
                [(r.user_id, r.chat_number + 1) for r in rooms],
            )

    # snapshots

    async def save_snapshot(self, snap: SnapshotRow) -> None:
        await self.db.execute(
            f"INSERT INTO snapshot ({SnapshotRow.columns}) VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (user_id, name) DO UPDATE SET agent_id = excluded.agent_id,"
            " platform_chat_id = excluded.platform_chat_id, messages = excluded.messages,"
            " created_at = excluded.created_at",
            snap.user_id,
            snap.name,
            snap.agent_id,
            snap.platform_chat_id,
            snap.messages,
            snap.created_at,
        )

    async def get_snapshot(self, user_id: str, name: str) -> SnapshotRow | None:
        row = await self.db.fetchrow(
            f"SELECT {SnapshotRow.columns} FROM snapshot WHERE user_id=$1 AND name=$2",
            user_id,
            name,
        )
        return SnapshotRow.from_row(row) if row else None

    async def snapshot_names(self, user_id: str) -> list[str]:
        """The names of the user's snapshots, in order (their contents are not read)."""
        rows = await self.db.fetch(
            "SELECT name FROM snapshot WHERE user_id=$1 ORDER BY name", user_id
        )
        return [row["name"] for row in rows]

    async def snapshot_bytes(self, user_id: str, name: str) -> int | None:
        """The size of a snapshot's contents (UTF-8), without reading them; None: no such."""
        size = await self.db.fetchval(
            f"SELECT {octets(self.db, 'messages')} FROM snapshot WHERE user_id=$1 AND name=$2",
            user_id,
            name,
        )
        return None if size is None else int(size)

    # history of stateless backends (see HistoryTable: bounded, pruned as turns are added)

    @_waits_out
    async def history(
        self, platform_chat_id: str, limit: int | None = None, excluding: str = ""
    ) -> list[HistoryRow]:
        """The conversation in order, its newest ``limit`` messages (never more than
        history.max_turns); the turn of the message ``excluding`` left out (it is being
        asked again)."""
        return await self.histories.rows(platform_chat_id, limit, excluding)

    @_waits_out
    async def history_size(self, platform_chat_id: str, excluding: str = "") -> HistorySize:
        """The conversation's size (one row of sums), the turn of ``excluding`` left out."""
        return await self.histories.size(platform_chat_id, excluding)

    @_waits_out
    async def append_history(
        self, platform_chat_id: str, messages: list[tuple[str, str]], message_id: str = ""
    ) -> None:
        """Appends (role, content) pairs after the conversation's last message, atomically;
        with ``message_id``, as that message's turn, replacing one it had (a re-ask after a
        crash never holds a turn twice). Turns past history.max_turns and history.max_kb
        (the oldest first) are pruned in the same transaction."""
        await self.histories.append(platform_chat_id, messages, message_id)

    async def drop_history(self, platform_chat_id: str) -> None:
        await self.histories.drop(platform_chat_id)

    # small plugin state

    async def get_value(self, key: str) -> str | None:
        return await self.db.fetchval("SELECT value FROM plugin_state WHERE key=$1", key)

    async def set_value(self, key: str, value: str) -> None:
        await self.db.execute(
            "INSERT INTO plugin_state (key, value) VALUES ($1, $2)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            key,
            value,
        )

    # usage: tokens per user, chat room and UTC day ('YYYY-MM-DD'); days compare as text

    @_waits_out_once
    async def add_usage(
        self, user_id: str, room_id: str, day: str, tokens_in: int, tokens_out: int
    ) -> None:
        """Counts one answered request and its tokens, atomically."""
        await self.db.execute(
            f"INSERT INTO usage ({UsageRow.columns}) VALUES ($1, $2, $3, $4, $5, 1)"
            " ON CONFLICT (user_id, room_id, day) DO UPDATE SET"
            " tokens_in = usage.tokens_in + excluded.tokens_in,"
            " tokens_out = usage.tokens_out + excluded.tokens_out,"
            " requests = usage.requests + 1",
            user_id,
            room_id,
            day,
            tokens_in,
            tokens_out,
        )

    @_waits_out
    async def usage_since(self, user_id: str, first_day: str) -> Totals:
        """A user's totals, all rooms together, from ``first_day`` on."""
        return await self._totals("user_id", user_id, first_day)

    async def chat_usage_since(self, room_id: str, first_day: str) -> Totals:
        """A chat room's totals, all its users together, from ``first_day`` on."""
        return await self._totals("room_id", room_id, first_day)

    async def _totals(self, column: str, value: str, first_day: str) -> Totals:
        row = await self.db.fetchrow(
            f"SELECT {USAGE_SUMS} FROM usage WHERE {column}=$1 AND day >= $2", value, first_day
        )
        return _totals_of(row)

    async def top_users(self, first_day: str, limit: int) -> list[tuple[str, int, int, int]]:
        """The users who spent the most tokens (in and out) from ``first_day`` on, most first:
        (user_id, tokens_in, tokens_out, requests)."""
        rows = await self.db.fetch(
            f"SELECT user_id, {USAGE_SUMS} FROM usage WHERE day >= $1 GROUP BY user_id"
            " ORDER BY SUM(tokens_in) + SUM(tokens_out) DESC, user_id LIMIT $2",
            first_day,
            limit,
        )
        return [(row["user_id"], *_totals_of(row)) for row in rows]

    async def usage_rows(self, first_day: str) -> list[UsageRow]:
        """Every usage row from ``first_day`` on, by day, user and room (for an export)."""
        rows = await self.db.fetch(
            f"SELECT {UsageRow.columns} FROM usage WHERE day >= $1 ORDER BY day, user_id, room_id",
            first_day,
        )
        return [UsageRow.from_row(row) for row in rows]

    # maintenance

    async def counts(self) -> dict[str, int]:
        """Rows per table (plugin_state, a few keys of the plugin's own, left out)."""
        result = {}
        for table in ("lambda_user", "chat_room", "snapshot", "history", "ledger", "usage"):
            result[table] = int(await self.db.fetchval(f"SELECT COUNT(*) FROM {table}"))
        return result

    async def clear_all(self) -> None:
        """Drops every row of the plugin's tables (the dev reset); the schema stays."""
        async with self._transaction() as conn:
            for table in TABLES:
                await conn.execute(f"DELETE FROM {table}")


def _totals_of(row: Record | None) -> Totals:
    if row is None:
        return 0, 0, 0
    return int(row["tokens_in"]), int(row["tokens_out"]), int(row["requests"])
