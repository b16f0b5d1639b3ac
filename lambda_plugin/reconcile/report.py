"""What a reconciliation comes to: its plan of writes and its report (stable keys, logged in
one line, shown by !lambda status)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..db import ChatRoomRow, UserRow


@dataclass
class Report:
    joined_rooms: int = 0
    restored_user_meta: int = 0  # user rows written (missing or different)
    restored_room_meta: int = 0  # plugin markers written into rooms (backfill, fixes)
    restored_chat_rows: int = 0  # chat rows that were missing from the database
    repaired_chat_rows: int = 0  # chat rows that differed from the rooms
    skipped_rooms: int = 0  # joined rooms that are not the plugin's
    # Joined rooms whose state could not be read: they keep their rows and are read again in
    # the background (reconcile/reread.py); each leaves the list once read.
    unreadable_rooms: list[str] = field(default_factory=list)
    conflicts: int = 0  # contradictions resolved deterministically (see log)
    repaired_links: int = 0  # m.space.child / m.space.parent written
    repaired_power_levels: int = 0  # rooms whose levels let users redact or send plugin state
    repaired_guest_access: int = 0  # managed rooms open to guests, closed
    encrypted_unreadable: int = 0  # managed rooms encrypted while the bot can't decrypt
    gone_rooms: int = 0  # rooms in the database the bot is no longer in
    invites: int = 0  # pending invites handed to onboarding
    writes: int = 0  # every write, database and homeserver
    requests: int = 0  # homeserver requests made
    seconds: float = 0.0
    dry_run: bool = False
    delta: bool = False  # a restart's read of the rooms changed since it stopped, only
    changed_rooms: int = 0  # the rooms that read found changed, read again

    def repairs(self) -> int:
        """What the run found wrong and made right (rows, room state, links)."""
        return (
            self.restored_user_meta + self.restored_room_meta + self.restored_chat_rows
            + self.repaired_chat_rows + self.repaired_links + self.repaired_power_levels
            + self.repaired_guest_access + self.gone_rooms
        )  # fmt: skip

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items())

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["seconds"] = round(self.seconds, 3)
        data["unreadable_rooms"] = listed(self.unreadable_rooms)
        return data


LISTED = 10  # room ids a report shows; the rest are counted


def listed(room_ids: list[str]) -> str:
    """Room ids for one log line: no spaces (``key=value`` pairs stay parseable), no line
    breaks or other control characters (a room id is whatever its server made it), bounded."""
    if not room_ids:
        return "none"
    shown = ["".join(c if c.isprintable() and not c.isspace() else "?" for c in r[:255])
             for r in room_ids[:LISTED]]  # fmt: skip
    more = len(room_ids) - len(shown)
    return ",".join(shown) + (f",…(+{more})" if more else "")


Write = tuple[str, str, str, dict[str, Any]]  # room id, event type, state key, content


@dataclass
class Plan:
    users: dict[str, UserRow] = field(default_factory=dict)
    rooms: dict[str, ChatRoomRow] = field(default_factory=dict)
    state_writes: list[Write] = field(default_factory=list)  # into rooms the bot manages
    report: Report = field(default_factory=Report)


@contextmanager
def without_gc() -> Iterator[None]:
    """Pauses the cyclic garbage collector: building tens of thousands of rows makes it run
    full collections over an ever larger heap, which turns linear work quadratic. Nothing
    made here is cyclic; the pause lasts one plan."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
