"""!help: the commands, one line each."""

from __future__ import annotations

from maubot import MessageEvent
from maubot.handlers import command

from ..texts import help_text
from .base import CommandBase, any_user


class HelpCommands(CommandBase):
    @command.new("help", help="List the commands")
    @any_user
    async def help(self, evt: MessageEvent) -> None:
        await self.reply_text(evt, help_text(self.settings().language))
