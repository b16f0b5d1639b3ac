"""A restart costs what changed, not what exists.

With the database intact, the stored sync position says where the plugin stopped (a
catch-up window back). One ``/sync`` from there, filtered to the state types reconciliation
reads, names the rooms whose state changed since (and the rooms the bot left); only those
are read again and settled (``Reconciler.reread``), and the start's gate opens. A full
reconciliation of every room follows in the background (``Reconciler.run`` at low
concurrency, after the gate is open): it repairs what the delta could not see (a room made
unmarked, adopted through its Space's listing) and logs what it repaired. A position the
homeserver refuses, or a room that can't be read now, means the start reads everything,
as without a position.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..matrix import HomeserverError, Matrix, one_off_sync_filter
from ..roomstate import STATE_TYPES
from .report import Report

REREADS_AT_ONCE = 8  # changed rooms read again at once during a start
# More changed rooms than one batched read holds (``reconcile.read_batch``; this when 0):
# reading each alone costs more than reading every room, which the start does then.
DELTA_MOST = 200
DELTA_READ_S = 10.0  # reconcile.delta_read_s's default


def delta_filter() -> str:
    """State changes of the types reconciliation reads, per room, and the rooms left; no
    messages, members, receipts or account data (a room with none of those changes is not
    in the answer); unique, as every one-off read."""
    return one_off_sync_filter(
        {"types": STATE_TYPES, "limit": 1}, state_types=STATE_TYPES, include_leave=True
    )


def changed_rooms(sync: Any) -> list[str]:
    """Rooms of a filtered /sync whose state changed (events in their state or timeline),
    and the rooms the bot left or was removed from; sorted, each once."""
    rooms = sync.get("rooms") if isinstance(sync, dict) else None
    if not isinstance(rooms, dict):
        return []
    changed: set[str] = set()
    joined = rooms.get("join")
    for room_id, data in (joined if isinstance(joined, dict) else {}).items():
        if isinstance(room_id, str) and _has_events(data):
            changed.add(room_id)
    left = rooms.get("leave")
    changed.update(r for r in (left if isinstance(left, dict) else {}) if isinstance(r, str))
    return sorted(changed)


def _has_events(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    for section in ("state", "timeline"):
        part = data.get(section)
        events = part.get("events") if isinstance(part, dict) else None
        if isinstance(events, list) and events:
            return True
    return False


async def changes_since(mx: Matrix, since: str, log: Any) -> list[str] | None:
    """The rooms whose state changed since ``since`` (None: the homeserver refused the
    position, every room is to be read). An outage is raised: the start tries again."""
    query = {"filter": delta_filter(), "since": since, "timeout": "0"}
    try:
        sync = await mx.sync(query)
    except HomeserverError as e:
        if e.status == 0 or e.status >= 500:
            raise
        log.info("The stored sync position was refused (%s): every room is read", e)
        return None
    return changed_rooms(sync)


async def reread_changed(
    changed: list[str], reread: Callable[[str], Awaitable[None]], log: Any,
    most: int = DELTA_MOST, read_s: float = DELTA_READ_S,
) -> Report | None:  # fmt: skip
    """Reads the changed rooms again; the report, or None when the full read is needed
    (more than ``most`` rooms changed, one that can't be read now). A room whose read takes
    longer than ``read_s`` is left to the verification after the gate: a room the homeserver
    is still joining over federation answers /state only once it has its whole state,
    minutes later, and the full read would wait for it too."""
    if len(changed) > most:
        log.info("%d rooms changed since the stop: every room is read", len(changed))
        return None
    limit = asyncio.Semaphore(REREADS_AT_ONCE)

    async def read(room_id: str) -> bool:
        async with limit:
            try:
                await asyncio.wait_for(reread(room_id), read_s)
                return True
            except asyncio.TimeoutError:
                log.warning("Reading the changed room %s took over %.0fs: verified later", room_id, read_s)
                return True
            except Exception as e:
                log.warning("Reading the changed room %s failed (%s): every room is read", room_id, e)
                return False

    if not all(await asyncio.gather(*(read(room_id) for room_id in changed))):
        return None
    return Report(delta=True, changed_rooms=len(changed))

