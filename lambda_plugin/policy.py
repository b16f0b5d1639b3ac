"""Policy: who gets an answer where, and how often. Pure decisions, no Matrix, no database.

The conversation stage asks ``admit`` before it records a message as handled (a message the
plugin does not take is left for nobody), and ``refusal`` after, in the room's turn.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable

from .config import Settings
from .db import ChatRoomRow


class Admission(enum.Enum):
    TAKE = "take"  # the room's agent answers it (or the user is told why not)
    POINT = "point"  # not a managed chat room: point the sender to their Space
    IGNORE = "ignore"  # not the plugin's to answer (another member, a stranger)


def admit(room: ChatRoomRow | None, sender: str, settings: Settings) -> Admission:
    """Whether a message in ``room`` from ``sender`` is the plugin's to answer."""
    if room is None or room.gone:
        return Admission.POINT
    if sender != room.user_id and not settings.shared_rooms:
        return Admission.IGNORE
    if sender not in settings.allowed_users:
        return Admission.IGNORE
    return Admission.TAKE


def refusal(room: ChatRoomRow, length: int, settings: Settings) -> tuple[str, dict] | None:
    """The text key (and values) of why a taken message gets no answer, or None."""
    if room.archived:
        return "archived.no_answer", {}
    if length > settings.max_message_chars:
        return "message.too_long", {"max": settings.max_message_chars}
    return None


PRUNE_AT = 1000  # users remembered before idle ones are dropped


class RateLimiter:
    """Requests per user and minute (all rooms together), in a sliding window."""

    def __init__(
        self, per_minute: Callable[[], int], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._recent: dict[str, deque[float]] = {}  # user -> times of their last requests
        self._told: dict[str, float] = {}  # user -> when they were last told to slow down

    def allow(self, user_id: str) -> bool:
        """Counts a request of the user; False past the limit (a refused one is not counted)."""
        now = self.clock()
        if len(self._recent) > PRUNE_AT:  # users idle for a minute are forgotten
            self._recent = {u: t for u, t in self._recent.items() if t and now - t[-1] <= 60}
        times = self._recent.setdefault(user_id, deque())
        while times and now - times[0] > 60:
            times.popleft()
        if len(times) >= self.per_minute():
            return False
        times.append(now)
        return True

    def tell(self, user_id: str) -> bool:
        """Whether to tell the user they are over the limit: once a window, not once a
        message (a flood of messages gets one notice)."""
        now = self.clock()
        self._told = {u: t for u, t in self._told.items() if now - t < 60}
        if user_id in self._told:
            return False
        self._told[user_id] = now
        return True
