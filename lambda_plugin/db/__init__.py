from .rows import ChatRoomRow, HistoryRow, SnapshotRow, UserRow, chat_number
from .store import UNIQUE_VIOLATION, Store, now_ms
from .upgrade import upgrade_table

__all__ = [
    "UNIQUE_VIOLATION",
    "ChatRoomRow",
    "HistoryRow",
    "SnapshotRow",
    "Store",
    "UserRow",
    "chat_number",
    "now_ms",
    "upgrade_table",
]
