"""Usage and quotas: tokens in and out per user, chat room and UTC day (the plugin database
only), and the daily and monthly limits a message is checked against before it is answered."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .agents import Usage
from .db import Store, month_start, utc_day
from .part import Part

Refusal = tuple[str, dict[str, object]]


@dataclass(eq=False, kw_only=True)
class Quota(Part):
    """Counts what answers cost and says when a user is over a limit."""

    store: Store

    async def record(self, user_id: str, room_id: str, usage: Usage | None) -> None:
        """Adds an answer's tokens (an agent that reports none still counts the request)."""
        tokens_in, tokens_out = (usage.tokens_in, usage.tokens_out) if usage else (0, 0)
        await self.store.add_usage(user_id, room_id, utc_day(), tokens_in, tokens_out)

    async def refusal(self, user_id: str) -> Refusal | None:
        """Why the user may not ask an agent now (over today's or this month's tokens), with
        when the limit resets; None when within both (0 is no limit)."""
        daily, monthly = self.settings().token_limits_of(user_id)
        if not daily and not monthly:
            return None
        today = utc_day()
        if daily and spent(await self.store.usage_since(user_id, today)) >= daily:
            return "quota.daily", {"limit": daily, "resets": _next_day()}
        first = month_start(today)
        if monthly and spent(await self.store.usage_since(user_id, first)) >= monthly:
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
