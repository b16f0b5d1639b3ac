"""The ledger's SQL: one row per user event, its fate. Only ``lambda_plugin.ledger`` calls it."""

from __future__ import annotations

from mautrix.util.async_db import Database

from .rows import LedgerRow
from .store import now_ms

# States after which nothing is left to do, ``kept`` aside (it waits for !retry).
ENDS = ("answered", "refused", "left", "superseded")


class LedgerTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, row: LedgerRow) -> bool:
        """Adds the row unless the event has one; False when it had."""
        added = await self.db.fetchval(
            f"INSERT INTO ledger ({LedgerRow.columns})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            row.event_id, row.room_id, row.sender, row.kind, row.state, row.reason, row.ts,
            row.event, row.answer_event, row.updated_at, row.replaces,
        )  # fmt: skip
        return added is not None

    async def insert(self, row: LedgerRow) -> LedgerRow:
        """Adds the row unless the event has one; returns the row as it is now (read back
        only when it was there already)."""
        if await self.add(row):
            return row
        found = await self.get(row.event_id)
        return found or row

    async def get(self, event_id: str) -> LedgerRow | None:
        row = await self.db.fetchrow(
            f"SELECT {LedgerRow.columns} FROM ledger WHERE event_id=$1", event_id
        )
        return LedgerRow.from_row(row) if row else None

    async def set_state(
        self, event_id: str, state: str, reason: str, keep_event: bool, answer_event: str = ""
    ) -> bool:
        """The event's new state, unless it has reached an end already (ends are final);
        its JSON is dropped unless it may still run (or be answered again: an answered
        message, for a 🔁). ``answer_event``: the answer's first event, when known. False
        when nothing changed."""
        changed = await self.db.fetchval(
            "UPDATE ledger SET state=$2, reason=$3, updated_at=$4,"
            " event = CASE WHEN $5 THEN event ELSE NULL END,"
            " answer_event = COALESCE($6, answer_event)"
            " WHERE event_id=$1 AND state NOT IN ($7, $8, $9, $10) RETURNING event_id",
            event_id, state, reason, now_ms(), keep_event, answer_event or None, *ENDS,
        )  # fmt: skip
        return changed is not None

    async def newer_message(self, room_id: str, turn: str, after_ms: int, before_ms: int) -> bool:
        """Whether the room has a message of another turn than ``turn`` sent between the two
        times (one not the room's to answer aside): then ``turn`` was not the latest."""
        found = await self.db.fetchval(
            "SELECT event_id FROM ledger WHERE room_id=$1 AND kind=$2 AND ts > $3 AND ts < $4"
            " AND COALESCE(replaces, event_id) <> $5 AND state <> $6 LIMIT 1",
            room_id, "message", after_ms, before_ms, turn, "left",
        )  # fmt: skip
        return found is not None

    async def of_turn(self, room_id: str, turn: str) -> list[LedgerRow]:
        """The rows of one conversation turn (the message, its edits, its 🔁s), newest first."""
        rows = await self.db.fetch(
            f"SELECT {LedgerRow.columns} FROM ledger WHERE room_id=$1"
            " AND (event_id=$2 OR replaces=$2) ORDER BY ts DESC, updated_at DESC LIMIT 100",
            room_id, turn,
        )  # fmt: skip
        return [LedgerRow.from_row(row) for row in rows]

    async def supersede_turn(self, room_id: str, turn: str, by: str, by_ts: int) -> None:
        """Ends what of the turn is not ended (kept, or not run yet) and is not newer than
        ``by`` as superseded by it; the event stays (an edit of it reads the original)."""
        await self.db.execute(
            "UPDATE ledger SET state=$4, reason=$5, updated_at=$6 WHERE room_id=$1"
            " AND (event_id=$2 OR replaces=$2) AND event_id <> $3 AND state IN ($7, $8, $9)"
            " AND ts <= $10",
            room_id, turn, by, "superseded", "edited", now_ms(), "seen", "taken", "kept", by_ts,
        )  # fmt: skip

    async def set_answer_event(self, event_id: str, answer_event: str) -> None:
        await self.db.execute(
            "UPDATE ledger SET answer_event=$2 WHERE event_id=$1", event_id, answer_event
        )

    async def in_states(self, states: tuple[str, ...], room_id: str | None = None) -> list[LedgerRow]:
        """Rows in ``states`` (of one room, or every room), oldest first."""
        marks = ", ".join(f"${i}" for i in range(1, len(states) + 1))
        query = f"SELECT {LedgerRow.columns} FROM ledger WHERE state IN ({marks})"
        args: list[object] = list(states)
        if room_id is not None:
            query += f" AND room_id=${len(args) + 1}"
            args.append(room_id)
        rows = await self.db.fetch(query + " ORDER BY ts, updated_at", *args)
        return [LedgerRow.from_row(row) for row in rows]

    async def states_of(self, event_ids: list[str]) -> dict[str, str]:
        """The state of each of these events the ledger has (checked in batches)."""
        found: dict[str, str] = {}
        for start in range(0, len(event_ids), 500):
            batch = event_ids[start : start + 500]
            marks = ", ".join(f"${i}" for i in range(1, len(batch) + 1))
            rows = await self.db.fetch(
                f"SELECT event_id, state FROM ledger WHERE event_id IN ({marks})", *batch
            )
            found.update((row["event_id"], row["state"]) for row in rows)
        return found

    async def prune(self, older_than_ms: int) -> None:
        await self.db.execute("DELETE FROM ledger WHERE updated_at < $1", older_than_ms)

