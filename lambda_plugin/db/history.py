"""The history of the stateless backends' conversations (echo, openai), bounded.

Each conversation keeps its newest turns (a turn is one row: a message or an answer) within
``HistoryBounds``: as turns are added, older ones past the bounds are pruned in the same
transaction, and how many were is counted (``plugin_state``, one key per conversation that
lost any). Every read is bounded too: at most ``max_turns`` rows, or one row of sums.
Appends of one conversation run one at a time, under that conversation's own lock (a lock
lives while it is held or awaited). Only ``Store`` calls this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from weakref import WeakValueDictionary

from mautrix.util.async_db import Connection, Database, Scheme

from .rows import HistoryRow, now_ms

PRUNED_KEY = "history_pruned:"  # + platform_chat_id: the turns pruned of it so far


@dataclass(frozen=True)
class HistoryBounds:
    """What one conversation keeps (history.max_turns, history.max_kb)."""

    max_turns: int = 200
    max_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class HistorySize:
    """A conversation's size as kept: its turns, their characters, the user's turns among
    them, and the turns pruned of it so far."""

    turns: int
    chars: int
    asked: int
    pruned: int


def octets(db: Database, column: str) -> str:
    """SQL for the UTF-8 size of a text column, on the engine ``db`` runs (SQLite before
    3.43 has no octet_length; a text cast to a blob is its bytes)."""
    if db.scheme == Scheme.SQLITE:
        return f"length(CAST({column} AS BLOB))"
    return f"octet_length({column})"


def newest_within(messages: list[tuple[str, str]], bounds: HistoryBounds) -> list[tuple[str, str]]:
    """The newest of ``messages`` that fit ``bounds`` on their own."""
    kept: list[tuple[str, str]] = []
    used = 0
    for message in reversed(messages[-bounds.max_turns :]):
        used += len(message[1].encode())
        if used > bounds.max_bytes:
            break
        kept.append(message)
    return kept[::-1]


class HistoryTable:
    def __init__(self, db: Database, bounds: Callable[[], HistoryBounds]) -> None:
        self.db = db
        self.bounds = bounds
        self._locks: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()
        self._octets = octets(db, "content")

    def lock(self, platform_chat_id: str) -> asyncio.Lock:
        lock = self._locks.get(platform_chat_id)
        if lock is None:
            lock = self._locks[platform_chat_id] = asyncio.Lock()
        return lock

    async def rows(self, platform_chat_id: str, limit: int | None, excluding: str) -> list[HistoryRow]:
        """The newest ``limit`` turns (at most ``max_turns``) in order, the turn of the
        message ``excluding`` left out."""
        bound = self.bounds().max_turns
        limit = bound if limit is None else max(0, min(limit, bound))
        rows = await self.db.fetch(
            f"SELECT {HistoryRow.columns} FROM history WHERE platform_chat_id=$1"
            " AND (message_id IS NULL OR message_id <> $2) ORDER BY seq DESC LIMIT $3",
            platform_chat_id, excluding, limit,
        )  # fmt: skip
        return [HistoryRow.from_row(row) for row in reversed(rows)]

    async def size(self, platform_chat_id: str, excluding: str) -> HistorySize:
        row = await self.db.fetchrow(
            "SELECT COUNT(*) AS turns, COALESCE(SUM(LENGTH(content)), 0) AS chars,"
            " COALESCE(SUM(CASE WHEN role = 'user' THEN 1 ELSE 0 END), 0) AS asked,"
            " (SELECT value FROM plugin_state WHERE key=$3) AS pruned"
            " FROM history WHERE platform_chat_id=$1 AND (message_id IS NULL OR message_id <> $2)",
            platform_chat_id, excluding, PRUNED_KEY + platform_chat_id,
        )  # fmt: skip
        assert row is not None
        pruned = int(row["pruned"]) if row["pruned"] else 0
        return HistorySize(int(row["turns"]), int(row["chars"]), int(row["asked"]), pruned)

    async def append(
        self, platform_chat_id: str, messages: list[tuple[str, str]], message_id: str
    ) -> None:
        """See ``Store.append_history``; what is past the bounds afterwards is pruned."""
        bounds = self.bounds()
        messages = [(role, storable(content)) for role, content in messages]
        kept = newest_within(messages, bounds)
        pruned = len(messages) - len(kept)
        conn: Connection
        async with self.lock(platform_chat_id), self.db.acquire() as conn, conn.transaction():
            if message_id:
                await conn.execute(
                    "DELETE FROM history WHERE platform_chat_id=$1 AND message_id=$2",
                    platform_chat_id, message_id,
                )  # fmt: skip
            last = await conn.fetchval(
                "SELECT MAX(seq) FROM history WHERE platform_chat_id=$1", platform_chat_id
            )
            seq = 0 if last is None else int(last) + 1
            if pruned:  # some of the new turns did not fit: no older one may stay either
                pruned += await self._prune_before(conn, platform_chat_id, seq)
            await self._insert(conn, platform_chat_id, seq, kept, message_id)
            if not pruned:
                pruned = await self._prune(conn, platform_chat_id, bounds)
            if pruned:
                await self._count_pruned(conn, platform_chat_id, pruned)

    async def _insert(
        self, conn: Connection, platform_chat_id: str, seq: int, kept: list[tuple[str, str]],
        message_id: str,
    ) -> None:  # fmt: skip
        if not kept:
            return
        stamp = now_ms()
        await conn.executemany(
            f"INSERT INTO history ({HistoryRow.columns}, message_id)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [
                (platform_chat_id, seq + i, role, content, stamp, message_id or None)
                for i, (role, content) in enumerate(kept)
            ],
        )

    async def _prune_before(self, conn: Connection, platform_chat_id: str, seq: int) -> int:
        older = await conn.fetchval(
            "SELECT COUNT(*) FROM history WHERE platform_chat_id=$1 AND seq < $2",
            platform_chat_id, seq,
        )  # fmt: skip
        if older:
            await conn.execute(
                "DELETE FROM history WHERE platform_chat_id=$1 AND seq < $2",
                platform_chat_id, seq,
            )  # fmt: skip
        return int(older or 0)

    async def _prune(self, conn: Connection, platform_chat_id: str, bounds: HistoryBounds) -> int:
        """Deletes the turns older than the newest that fit ``bounds``; how many it did."""
        row = await conn.fetchrow(
            "SELECT MAX(seq) AS cut, COUNT(*) AS older FROM ("
            " SELECT seq, ROW_NUMBER() OVER (ORDER BY seq DESC) AS n,"
            f" SUM({self._octets}) OVER (ORDER BY seq DESC ROWS UNBOUNDED PRECEDING) AS total"
            " FROM history WHERE platform_chat_id=$1"
            ") AS ranked WHERE n > $2 OR total > $3",
            platform_chat_id, bounds.max_turns, bounds.max_bytes,
        )  # fmt: skip
        if row is None or row["cut"] is None:
            return 0
        await conn.execute(
            "DELETE FROM history WHERE platform_chat_id=$1 AND seq <= $2",
            platform_chat_id, row["cut"],
        )  # fmt: skip
        return int(row["older"])

    async def _count_pruned(self, conn: Connection, platform_chat_id: str, pruned: int) -> None:
        key = PRUNED_KEY + platform_chat_id
        before = await conn.fetchval("SELECT value FROM plugin_state WHERE key=$1", key)
        total = str(int(before or 0) + pruned)
        await conn.execute(
            "INSERT INTO plugin_state (key, value) VALUES ($1, $2)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            key, total,
        )  # fmt: skip

    async def drop(self, platform_chat_id: str) -> None:
        conn: Connection
        async with self.lock(platform_chat_id), self.db.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM history WHERE platform_chat_id=$1", platform_chat_id)
            await conn.execute(
                "DELETE FROM plugin_state WHERE key=$1", PRUNED_KEY + platform_chat_id
            )


def storable(text: str) -> str:
    """``text`` as both engines store it: PostgreSQL's text holds no NUL character (JSON
    and Matrix allow one), so it becomes U+FFFD, on SQLite alike."""
    return text.replace("\x00", "\ufffd")
