"""Rebuilds the database from the rooms themselves: Matrix topology is the truth.

The topology is read with one ``/joined_rooms`` and the rooms' state of the types
reconciliation reads (``STATE_TYPES``), ``reconcile.read_batch`` rooms a request through
the homeserver's simplified sliding sync (MSC4186), each batch parsed as it arrives
(``roomstate.parse_room``); a room a batch did not bring, and every room of a homeserver
without sliding sync, is read with its own ``/state`` (bounded concurrency). (A filtered
full-state ``/sync`` would be one request, but Synapse's answer with a short timeline leaves
out the newest state events, such as the last ``m.space.child`` of a Space, so it cannot be
trusted; sliding sync's ``required_state`` is the current state.) ``plan()``
(``plan.py``) is a pure function of what was read and the database's rows, made of named
phases, so it is tested and benchmarked without a homeserver; ``Reconciler.run()``
(``reconciler.py``) applies the plan. It never creates a room or a Space; it writes missing
plugin state and links into rooms the bot already manages, and a second run on a consistent
database writes nothing.
"""

from ..roomstate import STATE_TYPES, RoomState, adopted_platform_chat_id, parse_room
from .plan import (
    Numbered,
    Plan,
    child_owners,
    diff_rows,
    find_chats,
    gone_rooms,
    guest_writes,
    link_writes,
    number_chats,
    parse_rooms,
    pick_spaces,
    plan,
    power_writes,
    restore_markers,
    trusted,
    user_row,
)
from .reconciler import BATCHES_AT_ONCE, READ_CONCURRENCY, Reconciler
from .report import Report
from .reread import Rereads, Settled, backoff_s, settle_room

__all__ = [
    "BATCHES_AT_ONCE",
    "READ_CONCURRENCY",
    "STATE_TYPES",
    "Numbered",
    "Plan",
    "Reconciler",
    "Report",
    "Rereads",
    "RoomState",
    "Settled",
    "adopted_platform_chat_id",
    "backoff_s",
    "child_owners",
    "diff_rows",
    "find_chats",
    "gone_rooms",
    "guest_writes",
    "link_writes",
    "number_chats",
    "parse_room",
    "parse_rooms",
    "pick_spaces",
    "plan",
    "power_writes",
    "restore_markers",
    "settle_room",
    "trusted",
    "user_row",
]
