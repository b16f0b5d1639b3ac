"""!help, and a clear answer for commands a later version brings."""

from __future__ import annotations

from maubot import MessageEvent
from maubot.handlers import command

from ..texts import help_text
from .base import CommandBase

PENDING_COMMANDS = ("clear", "save", "load", "cancel", "retry", "context", "agent", "lambda")


class HelpCommands(CommandBase):
    @command.new("help", help="List the commands")
    async def help(self, evt: MessageEvent) -> None:
        if not await self.begin(evt):
            return
        await self.bot.notify(evt.room_id, help_text(self.bot.settings.language))

    @command.new(
        PENDING_COMMANDS[0],
        aliases=PENDING_COMMANDS[1:],
        help="Commands not yet available",
        arg_fallthrough=False,
        require_subcommand=False,
    )
    @command.argument("rest", pass_raw=True, required=False)
    async def pending(self, evt: MessageEvent, rest: str) -> None:
        if not await self.begin(evt):
            return
        name = evt.content.body.split(maxsplit=1)[0]
        await self.reply(evt, "not_yet", command=name)
