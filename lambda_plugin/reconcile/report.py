"""The report of a reconciliation: stable keys, logged in one line, shown by !lambda status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Report:
    joined_rooms: int = 0
    restored_user_meta: int = 0  # user rows written (missing or different)
    restored_room_meta: int = 0  # plugin markers written into rooms (backfill, fixes)
    restored_chat_rows: int = 0  # chat rows that were missing from the database
    repaired_chat_rows: int = 0  # chat rows that differed from the rooms
    skipped_rooms: int = 0  # joined rooms that are not the plugin's
    conflicts: int = 0  # contradictions resolved deterministically (see log)
    repaired_links: int = 0  # m.space.child / m.space.parent written
    repaired_power_levels: int = 0  # rooms whose levels let users redact or send plugin state
    encrypted_unreadable: int = 0  # managed rooms encrypted while the bot can't decrypt
    gone_rooms: int = 0  # rooms in the database the bot is no longer in
    invites: int = 0  # pending invites handed to onboarding
    writes: int = 0  # every write, database and homeserver
    requests: int = 0  # homeserver requests made
    seconds: float = 0.0
    dry_run: bool = False

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items())

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["seconds"] = round(self.seconds, 3)
        return data
