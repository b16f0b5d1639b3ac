"""What every command class shares: answering in the user's language, and the checks that
answer a refusal themselves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from maubot import MessageEvent

from ..db import ChatRoomRow
from ..texts import text

if TYPE_CHECKING:
    from ..bot import LambdaBot


class CommandBase:
    def __init__(self, bot: LambdaBot) -> None:
        self.bot = bot

    async def begin(self, evt: MessageEvent) -> bool:
        """Every command starts here: waits until the plugin is ready, and says whether the
        event is new (a redelivered or already handled one is not answered twice)."""
        await self.bot.ready.wait()
        if self.bot.stopping:
            return False
        return await self.bot.store.mark_handled(evt.event_id, evt.room_id)

    async def reply(self, evt: MessageEvent, key: str, **values: object) -> None:
        await self.bot.notify(evt.room_id, text(self.bot.settings.language, key, **values))

    async def allowed(self, evt: MessageEvent) -> bool:
        """True for users the access policy admits; others are told so."""
        if evt.sender in self.bot.settings.allowed_users:
            return True
        await self.reply(evt, "refused")
        return False

    async def owned_chat(self, evt: MessageEvent) -> ChatRoomRow | None:
        """The chat room the command was sent in, when the sender owns it; else says so."""
        room = self.bot.registry.room(evt.room_id)
        if room is None or room.gone or room.user_id != evt.sender:
            await self.reply(evt, "not_chat_room")
            return None
        return room
