from .history import HistoryBounds, HistorySize
from .rows import (
    ChatRoomRow,
    FilePlaceRow,
    HistoryRow,
    LedgerRow,
    SnapshotRow,
    UsageRow,
    UserRow,
    chat_number,
    month_start,
    utc_day,
)
from .store import DATABASE_DOWN, TABLES, UNIQUE_VIOLATION, Store, Totals, now_ms
from .upgrade import upgrade_table

__all__ = [
    "DATABASE_DOWN",
    "TABLES",
    "UNIQUE_VIOLATION",
    "ChatRoomRow",
    "FilePlaceRow",
    "HistoryBounds",
    "HistoryRow",
    "HistorySize",
    "LedgerRow",
    "SnapshotRow",
    "Store",
    "Totals",
    "UsageRow",
    "UserRow",
    "chat_number",
    "month_start",
    "now_ms",
    "upgrade_table",
    "utc_day",
]
