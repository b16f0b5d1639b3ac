"""!usage: what the user's answers cost, today, this month and in this chat."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from maubot import MessageEvent
from maubot.handlers import command

from ..db import UsageRow, month_start, utc_day
from ..registry import Registry
from .base import CommandBase, allowed_user


def usage_csv(rows: list[UsageRow]) -> bytes:
    """The usage rows as CSV (a header, then one row per user, chat room and day)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["day", "user_id", "room_id", "tokens_in", "tokens_out", "requests"])
    for row in rows:
        writer.writerow(
            [row.day, row.user_id, row.room_id, row.tokens_in, row.tokens_out, row.requests]
        )
    return out.getvalue().encode()


@dataclass(eq=False, kw_only=True)
class UsageCommands(CommandBase):
    """The user's own usage (the admins' overview is `!lambda usage`)."""

    registry: Registry

    @command.new("usage", help="Your tokens today and this month: !usage", must_consume_args=False)
    @allowed_user
    async def usage(self, evt: MessageEvent) -> None:
        today = utc_day()
        first = month_start(today)
        daily, monthly = self.settings().token_limits_of(evt.sender)
        lines = [
            self.notices.text("usage.title"),
            self.line("usage.today", await self.store.usage_since(evt.sender, today), daily),
            self.line("usage.month", await self.store.usage_since(evt.sender, first), monthly),
        ]
        room = self.registry.room(evt.room_id)
        if room is not None and room.user_id == evt.sender:
            chat = await self.store.chat_usage_since(evt.room_id, first)
            lines.append(self.line("usage.chat", chat, 0))
        await self.reply_text(evt, "\n".join(lines))

    def line(self, period: str, totals: tuple[int, int, int], limit: int) -> str:
        tokens_in, tokens_out, requests = totals
        limit_text = self.notices.text("usage.limit", limit=limit) if limit else ""
        return self.notices.text(
            "usage.line", period=self.notices.text(period), tokens_in=tokens_in,
            tokens_out=tokens_out, requests=requests, limit=limit_text,
        )  # fmt: skip
