"""!help: the commands, one line each."""

from __future__ import annotations

from maubot import MessageEvent
from maubot.handlers import command

from ..texts import help_text
from .base import CommandBase, any_user


class HelpCommands(CommandBase):
    @command.new("help", help="List the commands", must_consume_args=False)
    @any_user
    async def help(self, evt: MessageEvent) -> None:
        settings = self.settings()
        heard = any(settings.transcription_for(agent_id) for agent_id in settings.agents)
        voice = "help.voice_on" if heard else "help.voice_off"
        await self.reply_text(evt, help_text(settings.language) + "\n\n" + self.notices.text(voice))
