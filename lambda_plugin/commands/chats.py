"""Chat management: !new, !chats, !rename, !encrypt, !archive, !unarchive, each in the
room's turn (after what was sent before it there)."""

from __future__ import annotations

from dataclasses import dataclass

from maubot import MessageEvent
from maubot.handlers import command

from ..agents import AgentError, Agents
from ..db import ChatRoomRow
from ..queue import Control, RoomQueues
from ..registry import Registry
from ..replies import Link, Verbatim
from ..roomstate import NAME_MAX, clean_name, matrix_to, new_platform_chat_id
from ..spaces import EncryptionUnavailable, Spaces, TooManyChats, chat_listing
from .base import LIST_BYTES, CommandBase, allowed_user, in_turn, owner_in_turn, snapshot_agent


@dataclass(eq=False, kw_only=True)
class ChatCommands(CommandBase):
    """Commands on the user's chat rooms."""

    registry: Registry
    spaces: Spaces
    agents: Agents
    queues: RoomQueues
    server_name: str

    async def valid_name(self, evt: MessageEvent, raw: str, example: str) -> str | None:
        """The cleaned name, or None after telling the user what is wrong with it."""
        name = clean_name(raw or "")
        if not name:
            await self.reply(evt, "name.empty", example=example)
            return None
        if len(name) > NAME_MAX:
            await self.reply(evt, "name.too_long", max=NAME_MAX)
            return None
        return name

    @command.new("new", help="New chat room in your Space: !new [name] [--from <snapshot>]")
    @command.argument("args", pass_raw=True, required=False)
    @in_turn
    @allowed_user
    async def new(self, evt: MessageEvent, args: str = "") -> Control | None:
        name, from_flag, snapshot_name = f" {args or ''} ".partition(" --from ")
        wanted = None
        if name.strip():
            wanted = await self.valid_name(evt, name, "!new Research")
            if wanted is None:
                return None

        async def run() -> None:  # in turn: a !save just before in this room has written it
            agent_id = platform_chat_id = None
            if from_flag:
                # The chat limit first: a refused !new must leave no restored conversation.
                if len(self.registry.rooms_of(evt.sender)) >= self.settings().max_chats_per_user:
                    await self.reply(evt, "new.too_many", max=self.settings().max_chats_per_user)
                    return
                fork = await self.fork(evt, snapshot_name)
                if fork is None:
                    return
                agent_id, platform_chat_id = fork
            if not await self.create(evt, wanted, agent_id, platform_chat_id) and platform_chat_id:
                await self.unfork(agent_id, platform_chat_id)

        return run

    async def create(
        self, evt: MessageEvent, wanted: str | None, agent_id: str | None,
        platform_chat_id: str | None,
    ) -> bool:  # fmt: skip
        """Makes the chat and says so; False when it was not made (the user told why)."""
        try:
            room = await self.on_homeserver(
                evt, "!new", self.spaces.new_chat(evt.sender, wanted, agent_id, platform_chat_id)
            )
        except TooManyChats:
            await self.reply(evt, "new.too_many", max=self.settings().max_chats_per_user)
            return False
        except EncryptionUnavailable:
            await self.reply(evt, "encryption.unavailable")
            return False
        if room is None:
            return False
        link = Link(room.name, matrix_to(room.room_id, self.server_name))
        await self.reply(evt, "new.created", link=link)
        return True

    async def unfork(self, agent_id: str | None, platform_chat_id: str) -> None:
        """Drops a conversation restored for a chat that was not made."""
        agent = self.agents.get(agent_id) if agent_id else None
        if agent is None:
            return
        try:
            await agent.drop(platform_chat_id)
        except AgentError as e:
            self.log.warning("Dropping the unused fork %s failed: %s", platform_chat_id, e)

    async def fork(self, evt: MessageEvent, raw_name: str) -> tuple[str, str] | None:
        """A new conversation restored from a snapshot: (agent id, platform_chat_id)."""
        snap = await self.read_snapshot(evt, clean_name(raw_name), "new.from_unknown")
        if snap is None:
            return None
        agent_id, agent = snapshot_agent(self.agents, snap, self.settings().default_agent)
        if agent is None:
            await self.reply(evt, "agent.unknown", agent=agent_id)
            return None
        platform_chat_id = new_platform_chat_id()
        try:
            await agent.restore(platform_chat_id, snap.messages)
        except AgentError as e:
            self.log.warning("Forking snapshot %s failed: %s", snap.name, e)
            language = self.settings().language
            await self.reply(evt, "agent.error", error=e.describe(language))
            return None
        return agent_id, platform_chat_id

    @command.new("chats", help="Your chats: !chats [archived]")
    @command.argument("which", pass_raw=True, required=False)
    @in_turn
    @allowed_user
    async def chats(self, evt: MessageEvent, which: str = "") -> Control | None:
        which = (which or "").strip().lower()
        if which not in ("", "archived"):
            await self.reply(evt, "chats.usage")
            return None
        archived = which == "archived"

        async def run() -> None:  # in turn: after a !new, !rename or !archive sent before it
            rooms = [
                r for r in self.registry.rooms_of(evt.sender)
                if not r.gone and r.archived == archived
            ]  # fmt: skip
            listing = chat_listing(self.notices, rooms, evt.room_id, LIST_BYTES, archived)
            await self.reply_text(evt, *listing)

        return run

    @command.new("rename", help="Rename this chat: !rename <name>")
    @command.argument("name", pass_raw=True, required=False)
    @owner_in_turn
    async def rename(self, evt: MessageEvent, room: ChatRoomRow, name: str = "") -> Control | None:
        new_name = await self.valid_name(evt, name, "!rename Research")
        if new_name is None:
            return None

        async def run() -> None:
            renamed = await self.on_homeserver(evt, "!rename", self.spaces.rename(room, new_name))
            if renamed is not None:
                await self.reply(evt, "renamed", name=Verbatim(renamed.name))

        return run

    @command.new("encrypt", help="End-to-end encrypt this chat: !encrypt --confirm")
    @command.argument("flags", pass_raw=True, required=False)
    @owner_in_turn
    async def encrypt(self, evt: MessageEvent, room: ChatRoomRow, flags: str = "") -> Control:
        async def run() -> None:  # in turn: never while an earlier answer is being sent
            crypto = self.spaces.mx.crypto
            if not crypto.available:
                await self.reply(evt, "encrypt.unavailable")
            elif await crypto.is_encrypted(room.room_id):
                await self.reply(evt, "encrypt.already")
            elif "--confirm" not in (flags or "").split():
                await self.reply(evt, "encrypt.confirm")
            elif await self.on_homeserver(evt, "!encrypt", self.spaces.encrypt(room)) is not None:
                await self.reply(evt, "encrypt.done")

        return run

    @command.new("archive", help="Archive this chat (history kept)", must_consume_args=False)
    @owner_in_turn
    async def archive(self, evt: MessageEvent, room: ChatRoomRow) -> Control:
        return lambda: self._set_archived(evt, room.room_id, True)

    @command.new("unarchive", help="Bring this chat back into your Space", must_consume_args=False)
    @owner_in_turn
    async def unarchive(self, evt: MessageEvent, room: ChatRoomRow) -> Control:
        return lambda: self._set_archived(evt, room.room_id, False)

    async def _set_archived(self, evt: MessageEvent, room_id: str, archived: bool) -> None:
        room = self.registry.room(room_id)  # as it is in turn, after an earlier !archive
        if room is None:  # forgotten meanwhile (a server reset)
            await self.reply(evt, "not_chat_room")
            return
        if room.archived == archived:
            await self.reply(evt, "already_archived" if archived else "not_archived")
            return
        changed = await self.on_homeserver(
            evt, "Archive change", self.spaces.set_archived(room, archived)
        )
        if changed is not None:
            key = "archived" if archived else "unarchived"
            await self.reply(evt, key, name=Verbatim(changed.name))
