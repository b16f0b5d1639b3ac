"""The SQL of the rooms the bot joined on a user's invite that it does not manage (their DM
with the bot, rooms of theirs): what ``access.max_joins_per_inviter`` counts, kept across
restarts. Only ``lambda_plugin.onboarding`` calls it."""

from __future__ import annotations

from mautrix.util.async_db import Database

from .store import now_ms


class JoinsTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def rooms_of(self, inviter: str) -> list[str]:
        """The rooms joined (or being joined) on ``inviter``'s invites, oldest first."""
        rows = await self.db.fetch(
            "SELECT room_id FROM joined_room WHERE inviter=$1 ORDER BY joined_at, room_id",
            inviter,
        )
        return [row["room_id"] for row in rows]

    async def add(self, room_id: str, inviter: str) -> None:
        """Counts the room for ``inviter`` (a room joined again on another's invite moves)."""
        await self.db.execute(
            "INSERT INTO joined_room (room_id, inviter, joined_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (room_id) DO UPDATE SET inviter=excluded.inviter,"
            " joined_at=excluded.joined_at",
            room_id, inviter, now_ms(),
        )  # fmt: skip

    async def remove(self, room_id: str) -> bool:
        """No longer counts the room; False when it was not counted."""
        removed = await self.db.fetchval(
            "DELETE FROM joined_room WHERE room_id=$1 RETURNING room_id", room_id
        )
        return removed is not None
