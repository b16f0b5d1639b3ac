"""!help, and a clear answer for commands a later version brings."""

from __future__ import annotations

from maubot import MessageEvent
from maubot.handlers import command

from ..texts import help_text
from .base import CommandBase


class HelpCommands(CommandBase):
    @command.new("help", help="List the commands")
    async def help(self, evt: MessageEvent) -> None:
        if not await self.begin(evt):
            return
        await self.bot.notify(evt.room_id, help_text(self.bot.settings.language))
