"""Usage and quotas: tokens in and out per user, chat room and UTC day (the plugin database
only), and the daily and monthly limits a message is checked against before it is answered."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from .agents import Usage
from .db import Store, month_start, utc_day
from .part import Part

Refusal = tuple[str, dict[str, object]]
# About this many characters make a token: what an answer cut before the agent said what it
# cost is counted as (docs/configuration.md).
CHARS_PER_TOKEN = 4


def estimate(text_in: int, text_out: int) -> Usage:
    """The tokens of ``text_in`` characters asked and ``text_out`` answered, estimated."""
    return Usage(math.ceil(text_in / CHARS_PER_TOKEN), math.ceil(text_out / CHARS_PER_TOKEN))


@dataclass(eq=False)
class Hold:
    """An estimate of a running answer's tokens, counted against its user's limits until
    the answer's real usage is recorded."""

    user_id: str
    tokens: int


@dataclass(eq=False, kw_only=True)
class Quota(Part):
    """Counts what answers cost and says when a user is over a limit."""

    store: Store
    _held: dict[str, list[Hold]] = field(default_factory=dict)  # user -> running answers

    @contextmanager
    def hold(self, user_id: str, message_chars: int) -> Iterator[Hold]:
        """Reserves a running answer's estimate (the message and
        ``access.answer_estimate_tokens``) while the block runs: answers running at once in
        many rooms can't all pass a limit before the first is counted."""
        tokens = estimate(message_chars, 0).tokens_in + self.settings().answer_estimate_tokens
        held = Hold(user_id, tokens)
        self._held.setdefault(user_id, []).append(held)  # before any await
        try:
            yield held
        finally:
            holds = self._held.get(user_id, [])
            if held in holds:
                holds.remove(held)
            if not holds:
                self._held.pop(user_id, None)

    def _others(self, held: Hold | None) -> int:
        if held is None:
            return 0
        return sum(h.tokens for h in self._held.get(held.user_id, []) if h is not held)

    async def record(self, user_id: str, room_id: str, usage: Usage | None) -> None:
        """Adds an answer's tokens (an agent that reports none still counts the request)."""
        tokens_in, tokens_out = (usage.tokens_in, usage.tokens_out) if usage else (0, 0)
        await self.store.add_usage(user_id, room_id, utc_day(), tokens_in, tokens_out)

    async def refusal(self, user_id: str, held: Hold | None = None) -> Refusal | None:
        """Why the user may not ask an agent now (over today's or this month's tokens, the
        estimates of their other running answers counted), with when the limit resets; None
        when within both (0 is no limit)."""
        daily, monthly = self.settings().token_limits_of(user_id)
        if not daily and not monthly:
            return None
        running = self._others(held)
        today = utc_day()
        if daily and spent(await self.store.usage_since(user_id, today)) + running >= daily:
            return "quota.daily", {"limit": daily, "resets": _next_day()}
        first = month_start(today)
        if monthly and spent(await self.store.usage_since(user_id, first)) + running >= monthly:
            return "quota.monthly", {"limit": monthly, "resets": _next_month()}
        return None


def spent(totals: tuple[int, int, int]) -> int:
    """Tokens in and out together: what a limit counts."""
    return totals[0] + totals[1]


def _next_day() -> str:
    now = datetime.now(timezone.utc)
    return (now + timedelta(days=1)).strftime("%Y-%m-%d 00:00 UTC")


def _next_month() -> str:
    now = datetime.now(timezone.utc)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return f"{year:04d}-{month:02d}-01 00:00 UTC"
