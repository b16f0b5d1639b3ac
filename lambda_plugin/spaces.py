"""Onboarding: what happens when someone invites the bot."""

from __future__ import annotations

from typing import TYPE_CHECKING

from maubot.handlers import event
from mautrix.errors import MatrixError
from mautrix.types import EventType, Membership, StateEvent

if TYPE_CHECKING:
    from .bot import LambdaBot


class Onboarding:
    def __init__(self, bot: LambdaBot) -> None:
        self.bot = bot

    @event.on(EventType.ROOM_MEMBER)
    async def on_member(self, evt: StateEvent) -> None:
        if evt.state_key != self.bot.client.mxid or evt.content.membership != Membership.INVITE:
            return
        await self.handle_invite(evt.room_id, evt.sender)

    async def handle_invite(self, room_id: str, inviter: str) -> None:
        if inviter not in self.bot.settings.allowed_users:
            self.bot.log.info("Refused invite from %s to %s", inviter, room_id)
            try:
                await self.bot.client.leave_room(room_id, reason="not allowed to use this bot")
            except MatrixError:
                self.bot.log.warning("Could not reject the invite to %s", room_id, exc_info=True)
            return
        await self.bot.client.join_room(room_id)
        self.bot.log.info("Joined %s on the invite of %s", room_id, inviter)
