"""!help: the commands, one line each; an admin's also lists the admin commands."""

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
        admin = evt.sender in settings.admins
        heard = any(settings.transcription_for(agent_id) for agent_id in settings.agents)
        lines = [help_text(settings.language, admin), "", self.notices.text("help.reactions")]
        lines.append(self.notices.text("help.voice_on" if heard else "help.voice_off"))
        if admin and not heard:  # how to turn it on is the operator's to know, not a user's
            lines.append(self.notices.text("help.voice_off_admin"))
        await self.reply_text(evt, "\n".join(lines))
