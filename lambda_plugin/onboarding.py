"""Membership events: invites (onboarding), the bot being kicked, renames done in the client."""

from __future__ import annotations

from typing import TYPE_CHECKING

from maubot.handlers import event
from mautrix.client import SyncStream
from mautrix.types import EventType, Membership, StateEvent

from .matrix import HomeserverError
from .roomstate import NAME_MAX, clean_name, matrix_to
from .texts import text

if TYPE_CHECKING:
    from .bot import LambdaBot


class Onboarding:
    def __init__(self, bot: LambdaBot) -> None:
        self.bot = bot

    @event.on(EventType.ROOM_MEMBER)
    async def on_member(self, evt: StateEvent) -> None:
        await self.bot.ready.wait()
        bot_id = self.bot.client.mxid
        membership = evt.content.membership
        if evt.state_key == bot_id and membership == Membership.INVITE:
            # An invite already joined shows up again in the room's timeline: not a new one.
            source = getattr(evt, "source", SyncStream.INVITED_ROOM)
            if source & SyncStream.INVITED_ROOM:
                await self.handle_invite(evt.room_id, evt.sender)
        elif evt.state_key == bot_id and membership in (Membership.LEAVE, Membership.BAN):
            await self.bot_removed(evt.room_id, evt.sender)

    @event.on(EventType.ROOM_NAME)
    async def on_name(self, evt: StateEvent) -> None:
        await self.bot.ready.wait()
        room = self.bot.registry.room(evt.room_id)
        if room is None or evt.sender == self.bot.client.mxid:
            return
        name = clean_name(evt.content.name or "")[:NAME_MAX]
        if evt.sender == room.user_id and name and name != room.name:
            await self.bot.registry.update_room(room.room_id, name=name)
            self.bot.log.info("Chat %s renamed in the client to %r", room.room_id, name)

    async def handle_invite(self, room_id: str, inviter: str) -> None:
        """Joins (or rejects) an invite and makes sure an allowed inviter has their Space."""
        settings = self.bot.settings
        if inviter not in settings.allowed_users:
            self.bot.log.info("Refused the invite of %s to %s", inviter, room_id)
            try:
                await self.bot.mx.leave(room_id, text(settings.language, "refused.reason"))
            except HomeserverError as e:
                self.bot.log.warning("Could not reject the invite to %s: %s", room_id, e)
            return
        try:
            await self.bot.mx.join(room_id)
        except HomeserverError as e:
            self.bot.log.warning("Could not join %s on the invite of %s: %s", room_id, inviter, e)
            return
        known = self.bot.registry.room(room_id)
        if known is not None or room_id in self.bot.registry.spaces:
            # Invited back into a room the plugin manages: it answers there again.
            if known is not None and known.gone:
                await self.bot.registry.update_room(room_id, gone=False)
                self.bot.log.info("Back in chat %s on the invite of %s", room_id, inviter)
            return
        try:
            result = await self.bot.spaces.provision(inviter)
        except HomeserverError:
            self.bot.log.exception("Provisioning for %s failed", inviter)
            return
        if not result.created_space:
            await self.bot.spaces.reinvite(inviter)  # back where they left, never a new Space
        lang = settings.language
        if result.first_room is not None:
            await self.bot.notify(
                result.first_room.room_id,
                text(
                    lang, "welcome", name=result.first_room.name, agent=result.first_room.agent_id
                ),
            )
        if not result.created_space and not await self._encrypted(room_id):
            space_name = await self._room_name(result.space_id)
            link = matrix_to(result.space_id, self.bot.mx.server_name)
            await self.bot.notify(room_id, text(lang, "space.exists", name=space_name, link=link))

    async def bot_removed(self, room_id: str, by: str) -> None:
        room = self.bot.registry.room(room_id)
        if room is not None and not room.gone:
            await self.bot.registry.update_room(room_id, gone=True)
            self.bot.log.info("Removed from chat %s by %s; marked gone", room_id, by)
        elif room_id in self.bot.registry.spaces:
            self.bot.log.warning("Removed from the Space %s by %s", room_id, by)

    async def _encrypted(self, room_id: str) -> bool:
        try:
            return await self.bot.mx.state_event(room_id, "m.room.encryption") is not None
        except HomeserverError:
            return True  # unknown: stay silent rather than write plaintext into a secret room

    async def _room_name(self, room_id: str) -> str:
        try:
            content = await self.bot.mx.state_event(room_id, "m.room.name")
        except HomeserverError:
            content = None
        return (content or {}).get("name") or room_id
