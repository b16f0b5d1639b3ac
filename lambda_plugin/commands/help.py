"""!help, and a clear answer for commands a later version brings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from maubot import MessageEvent
from maubot.handlers import command

from ..texts import help_text, text

if TYPE_CHECKING:
    from ..bot import LambdaBot

PENDING_COMMANDS = (
    "new", "chats", "rename", "archive", "unarchive", "clear", "save", "load",
    "cancel", "retry", "context", "agent", "lambda",
)  # fmt: skip


class HelpCommands:
    def __init__(self, bot: LambdaBot) -> None:
        self.bot = bot

    @command.new("help", help="List the commands")
    async def help(self, evt: MessageEvent) -> None:
        await evt.respond(help_text(self.bot.settings.language))

    @command.new(
        "new",
        aliases=PENDING_COMMANDS[1:],
        help="Commands not yet available",
        arg_fallthrough=False,
        require_subcommand=False,
    )
    @command.argument("rest", pass_raw=True, required=False)
    async def pending(self, evt: MessageEvent, rest: str) -> None:
        name = evt.content.body.split(maxsplit=1)[0]
        await evt.respond(text(self.bot.settings.language, "not_yet", command=name))
