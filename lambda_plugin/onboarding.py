"""Membership events: invites (onboarding), the bot being kicked, renames done in the client."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from maubot.handlers import event
from mautrix.client import SyncStream
from mautrix.types import (
    EventType,
    Membership,
    MemberStateEventContent,
    RoomNameStateEventContent,
    StateEvent,
)

from .chats import Chats
from .db.joins import JoinsTable
from .gate import StartGate
from .matrix import HomeserverError, Matrix
from .notices import Notices
from .part import Part
from .registry import Registry
from .replies import Link
from .roomstate import chat_name, matrix_to
from .spaces import EncryptionUnavailable, Provisioned, Spaces
from .welcome import Welcomes

INVITES_REMEMBERED = 1000
# A user at access.max_joins_per_inviter: how often their rooms are checked against the
# rooms the bot is really in (rows of rooms it left while stopped are dropped then).
CHECK_JOINED_EVERY_S = 60.0
# Waits between tries of a join that failed as an invite over federation can at first
# (the inviting server sends it before it stored it itself: 403 "not invited", FACTS.md).
JOIN_RETRY_S = (1.0, 2.0, 4.0, 8.0, 15.0)
UNENCRYPTABLE = (
    "No Space for %s: spaces.encryption is always, and the bot's client cannot encrypt"
    " (maubot needs its encryption extra and the client a device id)"
)


@dataclass(eq=False, kw_only=True)
class Onboarding(Part):
    """Invites, the bot leaving rooms, and renames done in the client."""

    gate: StartGate
    mx: Matrix
    spaces: Spaces
    chats: Chats
    notices: Notices
    joins: JoinsTable  # rooms joined on a user's invite that the plugin does not manage
    welcomes: Welcomes

    # Invites handled lately, oldest first (a dict keeps insertion order).
    _invites_seen: dict[tuple[str, str], None] = field(default_factory=dict)
    # Counting a room for its inviter is one step at a time: invites at once can't all pass.
    _joins_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _joining: set[str] = field(default_factory=set)  # rooms counted, their join under way
    _checked: dict[str, float] = field(default_factory=dict)  # inviter -> last check

    @property
    def registry(self) -> Registry:
        return self.chats.registry

    @event.on(EventType.ROOM_MEMBER)
    async def on_member(self, evt: StateEvent) -> None:
        if not await self.gate.wait():
            return
        if not isinstance(evt.content, MemberStateEventContent):
            return
        membership = evt.content.membership
        if evt.state_key == self.mx.user_id and membership == Membership.INVITE:
            # An invite already joined shows up again in the room's timeline: not a new one.
            source = getattr(evt, "source", SyncStream.INVITED_ROOM)
            if source & SyncStream.INVITED_ROOM:
                await self.handle_invite(evt.room_id, evt.sender)
        elif evt.state_key == self.mx.user_id and membership in (Membership.LEAVE, Membership.BAN):
            await self.bot_removed(evt.room_id, evt.sender)
        elif membership == Membership.JOIN and evt.state_key != self.mx.user_id:
            await self.member_joined(evt.room_id, evt.state_key, evt.prev_content)

    async def member_joined(self, room_id: str, user_id: str, before: object) -> None:
        """A chat room's owner arrived (not a profile change of one already there): the
        welcome goes now, so it is in their sync."""
        if getattr(before, "membership", None) == Membership.JOIN:
            return
        if user_id not in self.registry.users:
            return
        async with self.spaces.lock(user_id):  # a room being made is recorded once it is made
            room = self.registry.room(room_id)
        if room is not None and room.user_id == user_id and not room.gone:
            await self.welcomes.owner_joined(room)

    @event.on(EventType.ROOM_NAME)
    async def on_name(self, evt: StateEvent) -> None:
        if not await self.gate.wait():
            return
        room = self.registry.room(evt.room_id)
        content = evt.content
        if room is None or evt.sender == self.mx.user_id:
            return
        if not isinstance(content, RoomNameStateEventContent):
            return
        name = chat_name(content.name)
        if evt.sender == room.user_id and name and name != room.name:
            await self.chats.update(room.room_id, name=name)
            self.log.info("Chat %s renamed in the client to %r", room.room_id, name)

    async def handle_invite(self, room_id: str, inviter: str) -> None:
        """Joins (or rejects) an invite and makes sure an allowed inviter has their Space.
        The same invite seen again while the bot is in the room (maubot delivers some twice;
        a start's catch-up and its first sync may both hold it) is handled once."""
        if (room_id, inviter) in self._invites_seen:
            return
        self._invites_seen[(room_id, inviter)] = None
        while len(self._invites_seen) > INVITES_REMEMBERED:
            del self._invites_seen[next(iter(self._invites_seen))]
        if not await self._accept(room_id, inviter):
            # Refused or failed: the bot is not in the room, so a later invite is a new one.
            self._invites_seen.pop((room_id, inviter), None)
            return
        known = self.registry.room(room_id)
        if known is not None or room_id in self.registry.spaces:
            # Invited back into a room the plugin manages: it answers there again.
            if known is not None and known.gone:
                await self.chats.update(room_id, gone=False)
                self.log.info("Back in chat %s on the invite of %s", room_id, inviter)
            return
        try:
            result = await self.spaces.provision(inviter)
        except HomeserverError:
            self.log.exception("Provisioning for %s failed", inviter)
            return
        except EncryptionUnavailable:
            self.log.error(UNENCRYPTABLE, inviter)
            await self.notices.say(room_id, "encryption.unavailable")
            return
        if not result.created_space:
            await self.spaces.reinvite(inviter)  # back where they left, never a new Space
        await self._welcome(room_id, result)

    async def _accept(self, room_id: str, inviter: str) -> bool:
        """Joins the room of an allowed inviter; rejects anyone else's invite, and an invite
        into a room of the inviter's own past ``access.max_joins_per_inviter``."""
        if inviter not in self.settings().allowed_users:
            self.log.info("Refused the invite of %s to %s", inviter, room_id)
            await self._reject(room_id, "refused.reason")
            return False
        if self._managed(room_id):
            return await self._join(room_id, inviter)
        if not await self._count_in(room_id, inviter):
            return False
        try:
            joined = await self._join(room_id, inviter)
        finally:
            self._joining.discard(room_id)
        if not joined:
            await self._count_out(room_id)
        return joined

    def _managed(self, room_id: str) -> bool:
        return self.registry.room(room_id) is not None or room_id in self.registry.spaces

    async def _reject(self, room_id: str, key: str, **values: object) -> None:
        try:
            await self.mx.leave(room_id, self.notices.text(key, **values))
        except HomeserverError as e:
            self.log.warning("Could not reject the invite to %s: %s", room_id, e)

    async def _count_in(self, room_id: str, inviter: str) -> bool:
        """Counts the room for its inviter before it is joined, or rejects the invite when
        they have the bot in ``access.max_joins_per_inviter`` rooms besides one (their DM
        with it) already. False, rejecting nothing, while the database fails: the invite
        stays, and the next start picks it up."""
        most = self.settings().max_joins_per_inviter
        try:
            async with self._joins_lock:
                rooms = [r for r in await self.joins.rooms_of(inviter) if r != room_id]
                if len(rooms) > most:
                    rooms = await self._still_joined(inviter, rooms)
                if len(rooms) <= most:
                    await self.joins.add(room_id, inviter)
                    self._joining.add(room_id)
                    return True
        except Exception:
            self.log.exception("Counting the rooms of %s failed; %s not joined", inviter, room_id)
            return False
        self.log.info(
            "Refused the invite of %s to %s: the bot is in %d rooms on their invites",
            inviter, room_id, len(rooms),
        )  # fmt: skip
        await self._reject(room_id, "invite.too_many", max=most)
        return False

    async def _still_joined(self, inviter: str, rooms: list[str]) -> list[str]:
        """``rooms`` less those the bot is not in (left while it was stopped, or a join a
        crash cut short), whose rows are dropped; asked of the homeserver at most once per
        CHECK_JOINED_EVERY_S and inviter."""
        now = time.monotonic()
        if now - self._checked.get(inviter, -CHECK_JOINED_EVERY_S) < CHECK_JOINED_EVERY_S:
            return rooms
        if len(self._checked) >= INVITES_REMEMBERED:
            recent = {u: t for u, t in self._checked.items() if now - t < CHECK_JOINED_EVERY_S}
            self._checked = recent
        self._checked[inviter] = now
        try:
            joined = set(await self.mx.joined_rooms())
        except HomeserverError as e:
            self.log.warning("Could not check the rooms of %s: %s", inviter, e)
            return rooms
        left = [r for r in rooms if r not in joined and r not in self._joining]
        for room_id in left:
            await self.joins.remove(room_id)
        return [r for r in rooms if r not in left]

    async def _count_out(self, room_id: str) -> bool:
        """No longer counts the room for its inviter; whether it was counted."""
        try:
            return await self.joins.remove(room_id)
        except Exception as e:  # the row is dropped when it matters (_still_joined)
            self.log.warning("Could not uncount %s: %s", room_id, e)
            return False

    async def _join(self, room_id: str, inviter: str) -> bool:
        """Joins, trying again while the inviting server may not be ready (403 "not
        invited", 404, 5xx, no connection); a local invite that is really gone (the local
        server knows its own invites) costs at most one more try."""
        local = inviter.split(":", 1)[-1] == self.mx.server_name
        delays = JOIN_RETRY_S[:1] if local else JOIN_RETRY_S
        for attempt in range(len(delays) + 1):
            try:
                await self.mx.join(room_id)
                return True
            except HomeserverError as e:
                if attempt == len(delays) or not _join_may_succeed_later(e):
                    self.log.warning("Could not join %s on the invite of %s: %s", room_id, inviter, e)
                    return False
                self.log.info(
                    "Joining %s on the invite of %s failed (%s); try %d in %.0fs",
                    room_id, inviter, e, attempt + 2, delays[attempt],
                )  # fmt: skip
                await asyncio.sleep(delays[attempt])
        return False

    async def _welcome(self, room_id: str, result: Provisioned) -> None:
        # The first chat's welcome waits for its owner's join (member_joined).
        readable = self.mx.crypto.available or not await self._encrypted(room_id)
        if not result.created_space and readable:
            space_name = await self._room_name(result.space_id)
            link = Link(space_name, matrix_to(result.space_id, self.mx.server_name))
            await self.notices.say(room_id, "space.exists", link=link)

    async def bot_removed(self, room_id: str, by: str) -> None:
        # Out of the room: the next invite to it is a new one.
        for key in [k for k in self._invites_seen if k[0] == room_id]:
            del self._invites_seen[key]
        room = self.registry.room(room_id)
        if room is not None and not room.gone:
            await self.chats.update(room_id, gone=True)
            self.log.info("Removed from chat %s by %s; marked gone", room_id, by)
        elif room_id in self.registry.spaces:
            self.log.warning("Removed from the Space %s by %s", room_id, by)
        # Not on its own leave (a rejected invite): only a room it is removed from.
        elif room is None and by != self.mx.user_id and await self._count_out(room_id):
            self.log.info("Removed from %s by %s; no longer counted for its inviter", room_id, by)

    async def _encrypted(self, room_id: str) -> bool:
        try:
            return await self.mx.state_event(room_id, "m.room.encryption") is not None
        except HomeserverError:
            return True  # unknown: stay silent rather than write plaintext into a secret room

    async def _room_name(self, room_id: str) -> str:
        try:
            content = await self.mx.state_event(room_id, "m.room.name")
        except HomeserverError:
            content = None
        return (content or {}).get("name") or room_id


def _join_may_succeed_later(error: HomeserverError) -> bool:
    """A join refusal an invite still on its way over federation gives, or an outage."""
    return error.status in (0, 403, 404) or error.status >= 500
