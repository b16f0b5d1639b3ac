"""Where each file message landed in the workspace: the file stage writes it, a reply's
quote reads it; aged out with the ledger."""

from __future__ import annotations

from mautrix.util.async_db import Database

from .rows import FilePlaceRow
from .store import now_ms


class FilePlaceTable:
    """Where each file message landed in the workspace, by (room, event). Holds only paths
    the plugin made itself, relative to the workspace root: no secret, nothing of the file."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def put(self, room_id: str, event_id: str, path: str) -> None:
        """Records the file's place; a message whose file is written again (a 🔁) moves."""
        await self.db.execute(
            f"INSERT INTO file_place ({FilePlaceRow.columns}) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (room_id, event_id) DO UPDATE SET path=excluded.path, ts=excluded.ts",
            room_id, event_id, path, now_ms(),
        )  # fmt: skip

    async def get(self, room_id: str, event_id: str) -> FilePlaceRow | None:
        """The place of the file message ``event_id`` of ``room_id`` (never another room's)."""
        row = await self.db.fetchrow(
            f"SELECT {FilePlaceRow.columns} FROM file_place WHERE room_id=$1 AND event_id=$2",
            room_id, event_id,
        )  # fmt: skip
        return FilePlaceRow.from_row(row) if row else None

    async def prune(self, older_than_ms: int) -> None:
        await self.db.execute("DELETE FROM file_place WHERE ts < $1", older_than_ms)
