"""Spaces and chat rooms: provisioning exactly once per user, chat creation, links and invites."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

from .chats import Chats
from .crypto import encryption_state
from .db import ChatRoomRow, Store, now_ms
from .marker import KIND_SPACE, MARKER_TYPE, Marker
from .matrix import HomeserverError, Matrix
from .notices import Notices
from .part import Part
from .replies import Link, fit_count
from .roomstate import (
    clean_name,
    creators_privileged,
    matrix_to,
    new_platform_chat_id,
    no_guests,
    power_levels,
    space_child,
    space_parent,
    topic,
)
from .texts import text

# Waits before createRoom is tried again after a failure that may not have made the room.
# After a failed createRoom, when the rooms the bot joined are looked at for the room it may
# have made all the same (a slow homeserver finishes a request its client gave up on).
CREATE_LOOK_S = (2.0, 5.0, 15.0, 30.0)
CREATE_TRIES = 3  # of a createRoom the homeserver refused to take (503)
# Room for a list in one answer: well under the event size limit with its HTML.
LIST_BYTES = 8_000


def chat_topic(language: str, agent_id: str) -> str:
    """A chat room's topic: its agent, and where the commands are."""
    return text(language, "chat.topic", agent=agent_id)


def chat_listing(
    notices: Notices, rooms: list[ChatRoomRow], here: str, budget: int, archived: bool = False
) -> tuple[str, str]:
    """What ``!chats`` says of ``rooms`` (and a Space written in): its Markdown and its plain
    body, each room linked by name (``here``: the room asked in, marked), as many rooms as
    fit ``budget`` bytes and "… and N more" (a list always fits one event)."""
    if not rooms:
        said = notices.text("chats.none_archived" if archived else "chats.none")
        return said, said
    title = notices.text("chats.archived_title" if archived else "chats.title")
    lines = [_chat_line(notices, room, here) for room in rooms]
    # The Markdown is the longer of the two (escapes, brackets): what fits bounds both.
    kept = fit_count([f"- {markdown}" for markdown, _ in lines], budget)
    more = [notices.text("list.more", count=len(lines) - kept)] if kept < len(lines) else []
    markdown = [title, *(f"- {line}" for line, _ in lines[:kept]), *more]
    plain = [title, *(f"- {line}" for _, line in lines[:kept]), *more]
    return "\n".join(markdown), "\n".join(plain)


def _chat_line(notices: Notices, room: ChatRoomRow, here: str) -> tuple[str, str]:
    link = Link(room.name, matrix_to(room.room_id, notices.mx.server_name))
    values: dict[str, object] = {"link": link, "chat_id": room.chat_id, "agent": room.agent_id}
    current = " " + notices.text("chats.current") if room.room_id == here else ""
    return (
        notices.text("chats.line", **values) + current,
        notices.plain("chats.line", **values) + current,
    )


@dataclass(frozen=True)
class Provisioned:
    space_id: str
    created_space: bool
    first_room: ChatRoomRow | None


class TooManyChats(Exception):
    pass


class EncryptionUnavailable(Exception):
    """spaces.encryption is "always" and the bot's client cannot encrypt: no room is made."""


@dataclass(eq=False, kw_only=True)
class Spaces(Part):
    """Provisioning: a user's Space and chat rooms, made exactly once."""

    mx: Matrix
    store: Store
    chats: Chats

    def __post_init__(self) -> None:
        self.registry = self.chats.registry
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._privileged: bool | None = None

    def lock(self, user_id: str) -> asyncio.Lock:
        """Held while a user's Space or rooms are created: one provisioning at a time per user."""
        return self._locks[user_id]

    async def power_levels(self, owner: str) -> dict[str, Any]:
        """The power levels of a new room, for the version it is made with (from v12 on,
        the creator's power is not in them)."""
        configured = self.settings().room_version
        if configured:
            return power_levels(owner, self.mx.user_id, creators_privileged(configured))
        if self._privileged is None:
            self._privileged = creators_privileged(await self.mx.default_room_version())
        return power_levels(owner, self.mx.user_id, self._privileged)

    def encrypt_chats(self) -> bool:
        """Whether new chat rooms are encrypted; EncryptionUnavailable when they must be and
        cannot (checked before anything is made)."""
        mode, available = self.settings().encryption, self.mx.crypto.available
        if mode == "always" and not available:
            raise EncryptionUnavailable()
        return mode != "never" and available

    async def provision(self, user_id: str) -> Provisioned:
        """Gives the user their Space and first chat, once; completes a half-made one."""
        self.encrypt_chats()
        async with self.lock(user_id):
            user = self.registry.users.get(user_id) or await self.registry.ensure_user(user_id)
            created = False
            space_id = user.space_id
            if not space_id:
                space_id = await self._create_space(user_id)
                # Written at once: a retry after this point finds the Space, never makes another.
                await self.registry.set_space(user_id, space_id)
                created = True
                self.log.info("Provisioned Space %s for %s", space_id, user_id)
            first_room = None
            if not self.registry.rooms_of(user_id):
                first_room = await self._create_chat(user_id, space_id)
            return Provisioned(space_id, created, first_room)

    async def new_chat(
        self,
        user_id: str,
        name: str | None = None,
        agent_id: str | None = None,
        platform_chat_id: str | None = None,
    ) -> ChatRoomRow:
        """A new chat room in the user's Space (made first if needed), the user invited."""
        provisioned = await self.provision(user_id)
        if provisioned.first_room is not None and not (name or agent_id or platform_chat_id):
            return provisioned.first_room
        async with self.lock(user_id):
            if len(self.registry.rooms_of(user_id)) >= self.settings().max_chats_per_user:
                raise TooManyChats()
            return await self._create_chat(
                user_id, provisioned.space_id, name, agent_id, platform_chat_id
            )

    async def _create_space(self, user_id: str) -> str:
        displayname = await self.mx.displayname(user_id) or user_id.split(":")[0].lstrip("@")
        settings = self.settings()
        name = settings.space_name.format(displayname=displayname, user_id=user_id)
        return await self._create_room(
            {
                "name": clean_name(name)[:255],
                "preset": "private_chat",
                "visibility": "private",
                "creation_content": {"type": "m.space"},
                "invite": [user_id],
                "initial_state": [
                    Marker(kind=KIND_SPACE, owner=user_id).state_event(),
                    no_guests(),
                    topic(text(settings.language, "space.topic")),
                    *self._avatar(),
                ],
                "power_level_content_override": await self.power_levels(user_id),
                **self._room_version(),
            }
        )

    def _room_version(self) -> dict[str, Any]:
        version = self.settings().room_version
        return {"room_version": version} if version else {}

    def _avatar(self) -> list[dict[str, Any]]:
        url = self.settings().space_avatar_url
        return [{"type": "m.room.avatar", "state_key": "", "content": {"url": url}}] if url else []

    async def _create_chat(
        self,
        user_id: str,
        space_id: str,
        name: str | None = None,
        agent_id: str | None = None,
        platform_chat_id: str | None = None,
    ) -> ChatRoomRow:
        number = await self.store.take_chat_index(user_id)
        settings = self.settings()
        chat_id = f"C{number}"
        name = name or settings.chat_name.format(n=number)
        agent_id = agent_id or settings.default_agent
        platform_chat_id = platform_chat_id or new_platform_chat_id()
        # The row first (its room id filled in once the room exists): the marker is made from it.
        room = ChatRoomRow(
            room_id="", user_id=user_id, chat_id=chat_id, name=name, agent_id=agent_id,
            platform_chat_id=platform_chat_id, archived=False, gone=False, created_at=now_ms(),
        )  # fmt: skip
        room_id = await self._create_room(await self._chat_room_body(room, space_id))
        room = replace(room, room_id=room_id)
        await self.chats.add(room)
        await self.mx.send_state(
            space_id, "m.space.child", space_child(self.mx.server_name, number), room_id
        )
        self.log.info("Created chat %s (%s) for %s in %s", chat_id, room_id, user_id, space_id)
        return room

    async def _create_room(self, body: dict[str, Any]) -> str:
        """createRoom, made once. A request that failed (a time-out, a lost connection, a
        5xx) may have made the room all the same, even seconds later: it is looked for by
        its marker (a chat's platform_chat_id is new, a Space's owner has none yet) among
        the rooms the bot joined since, a while. Only a 503 (the homeserver did not take
        the request) is tried again; a room made after all and found by none of the looks
        is adopted by the next start's reconciliation."""
        marker = Marker.from_content(body["initial_state"][0]["content"])
        before = await self._joined()
        for attempt in range(CREATE_TRIES):
            try:
                return await self.mx.create_room(body)
            except HomeserverError as e:
                if not (e.status == 0 or e.status >= 500):
                    raise
                self.log.warning("createRoom failed (%s); looking for the room it may have made", e)
                made = await self._look_for(marker, before)
                if made is not None:
                    self.log.info("createRoom had made %s after all", made)
                    return made
                if e.status != 503 or attempt == CREATE_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def _joined(self) -> set[str] | None:
        try:
            return set(await self.mx.joined_rooms())
        except HomeserverError:
            return None  # the looks, if any, then check the rooms the plugin does not know

    async def _look_for(self, marker: Marker | None, before: set[str] | None) -> str | None:
        for delay in CREATE_LOOK_S:
            await asyncio.sleep(delay)
            made = await self._made(marker, before)
            if made is not None:
                return made
        return None

    async def _made(self, marker: Marker | None, before: set[str] | None) -> str | None:
        """A room the bot joined since ``before`` (or one the plugin does not know) whose
        marker, sent by the bot, is ``marker``; None when there is none (yet)."""
        try:
            joined = await self.mx.joined_rooms()
        except HomeserverError as e:
            self.log.warning("Could not look for the room createRoom may have made: %s", e)
            return None
        for room_id in joined:
            if room_id in (before if before is not None else ()):
                continue
            if room_id in self.registry.rooms or room_id in self.registry.spaces:
                continue
            try:  # one room that can't be read is not the end of the look
                events = await self.mx.state(room_id)
            except HomeserverError as e:
                self.log.debug("Could not read %s looking for a made room: %s", room_id, e)
                continue
            if any(self._is_marker(event, marker) for event in events):
                return room_id
        return None

    def _is_marker(self, event: dict[str, Any], marker: Marker | None) -> bool:
        return (
            event.get("type") == MARKER_TYPE
            and event.get("state_key") == ""
            and event.get("sender") == self.mx.user_id
            and Marker.from_content(event.get("content")) == marker
        )

    async def _chat_room_body(self, room: ChatRoomRow, space_id: str) -> dict[str, Any]:
        """The createRoom request of a chat room: its marker and Space link in it from the start."""
        parent = {
            "type": "m.space.parent",
            "state_key": space_id,
            "content": space_parent(self.mx.server_name),
        }
        return {
            "name": room.name,
            "preset": "private_chat",
            "visibility": "private",
            "invite": [room.user_id],
            "initial_state": [
                Marker.for_chat(room, space_id).state_event(),
                parent,
                no_guests(),
                topic(chat_topic(self.settings().language, room.agent_id)),
                *([encryption_state()] if self.encrypt_chats() else []),
            ],
            "power_level_content_override": await self.power_levels(room.user_id),
            **self._room_version(),
        }

    async def set_archived(self, room: ChatRoomRow, archived: bool) -> ChatRoomRow:
        """Takes the room out of the Space (a child event without via) or puts it back."""
        space_id = self.registry.users[room.user_id].space_id
        assert space_id is not None
        child = {} if archived else space_child(self.mx.server_name, room.chat_number)
        await self.mx.send_state(space_id, "m.space.child", child, room.room_id)
        room = await self.chats.update(room.room_id, archived=archived)
        self.log.info(
            "%s chat %s (%s)", "Archived" if archived else "Unarchived", room.chat_id, room.room_id
        )
        return room

    async def encrypt(self, room: ChatRoomRow) -> ChatRoomRow:
        """Turns on end-to-end encryption in the chat room (for good: it can't be undone)."""
        await self.mx.send_state(room.room_id, "m.room.encryption", encryption_state()["content"])
        self.mx.crypto.forget(room.room_id)
        self.log.info("Chat %s (%s) is now end-to-end encrypted", room.chat_id, room.room_id)
        return room

    async def rename(self, room: ChatRoomRow, name: str) -> ChatRoomRow:
        await self.mx.send_state(room.room_id, "m.room.name", {"name": name})
        return await self.chats.update(room.room_id, name=name)

    async def reinvite(self, user_id: str) -> None:
        """Invites the user back into their Space and active rooms wherever they left."""
        user = self.registry.users.get(user_id)
        if not user or not user.space_id:
            return
        targets = [user.space_id] + [r.room_id for r in self.registry.active_rooms_of(user_id)]
        for room_id in targets:
            try:
                if await self.mx.membership(room_id, user_id) not in ("join", "invite"):
                    await self.mx.invite(room_id, user_id)
                    self.log.info("Re-invited %s to %s", user_id, room_id)
            except HomeserverError as e:
                self.log.warning("Could not re-invite %s to %s: %s", user_id, room_id, e)

    async def leave_everything(self, keep_room: str | None = None) -> int:
        """The dev server reset: removes the users from every managed room and Space and
        leaves them; returns how many rooms were left."""
        registry = self.registry
        targets = {room.room_id: room.user_id for room in registry.rooms.values() if not room.gone}
        targets.update({space_id: owner for space_id, owner in registry.spaces.items()})
        left = 0
        for room_id, owner in targets.items():
            if room_id == keep_room:
                continue
            try:
                if await self.mx.membership(room_id, owner) in ("join", "invite"):
                    await self.mx.kick(room_id, owner, "reset")
                await self.mx.leave(room_id)
                left += 1
            except HomeserverError as e:
                self.log.warning("Reset could not leave %s: %s", room_id, e)
        self.log.info("Server reset: left %d rooms", left)
        return left
