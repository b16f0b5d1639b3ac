"""Chat management: !new, !chats, !rename, !archive, !unarchive."""

from __future__ import annotations

from dataclasses import dataclass

from maubot import MessageEvent
from maubot.handlers import command

from ..agents import AgentError, Agents
from ..db import ChatRoomRow
from ..registry import Registry
from ..roomstate import NAME_MAX, clean_name, matrix_to, new_platform_chat_id
from ..spaces import EncryptionUnavailable, Spaces, TooManyChats
from .base import LIST_BYTES, CommandBase, allowed_user, chat_owner


@dataclass(eq=False, kw_only=True)
class ChatCommands(CommandBase):
    """Commands on the user's chat rooms."""

    registry: Registry
    spaces: Spaces
    agents: Agents
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
    @allowed_user
    async def new(self, evt: MessageEvent, args: str = "") -> None:
        name, from_flag, snapshot_name = f" {args or ''} ".partition(" --from ")
        wanted = None
        if name.strip():
            wanted = await self.valid_name(evt, name, "!new Research")
            if wanted is None:
                return
        agent_id = platform_chat_id = None
        if from_flag:
            fork = await self.fork(evt, snapshot_name)
            if fork is None:
                return
            agent_id, platform_chat_id = fork
        try:
            room = await self.on_homeserver(
                evt, "!new", self.spaces.new_chat(evt.sender, wanted, agent_id, platform_chat_id)
            )
        except TooManyChats:
            await self.reply(evt, "new.too_many", max=self.settings().max_chats_per_user)
            return
        except EncryptionUnavailable:
            await self.reply(evt, "encryption.unavailable")
            return
        if room is None:
            return
        link = matrix_to(room.room_id, self.server_name)
        await self.reply(evt, "new.created", name=room.name, link=link)

    async def fork(self, evt: MessageEvent, raw_name: str) -> tuple[str, str] | None:
        """A new conversation restored from a snapshot: (agent id, platform_chat_id)."""
        name = clean_name(raw_name)
        snap = await self.store.get_snapshot(evt.sender, name) if name else None
        if snap is None:
            names = await self.snapshot_names(evt.sender)
            await self.reply(evt, "new.from_unknown", name=name[:64], names=names)
            return None
        agent = self.agents.get(snap.agent_id)
        agent_id = snap.agent_id
        if agent is None:
            agent_id = self.settings().default_agent
            agent = self.agents.get(agent_id)
        platform_chat_id = new_platform_chat_id()
        try:
            assert agent is not None
            await agent.restore(platform_chat_id, snap.messages)
        except AgentError as e:
            self.log.warning("Forking snapshot %s failed: %s", name, e)
            language = self.settings().language
            await self.reply(evt, "agent.error", error=e.describe(language))
            return None
        return agent_id, platform_chat_id

    @command.new("chats", help="Your chats: !chats [archived]")
    @command.argument("which", pass_raw=True, required=False)
    @allowed_user
    async def chats(self, evt: MessageEvent, which: str = "") -> None:
        which = (which or "").strip().lower()
        if which not in ("", "archived"):
            await self.reply(evt, "chats.usage")
            return
        archived = which == "archived"
        rooms = [
            r for r in self.registry.rooms_of(evt.sender) if not r.gone and r.archived == archived
        ]
        if not rooms:
            await self.reply(evt, "chats.none_archived" if archived else "chats.none")
            return
        lines = [self.notices.text("chats.archived_title" if archived else "chats.title")]
        lines += self.fitting([f"- {self.chat_line(room, evt.room_id)}" for room in rooms], LIST_BYTES)
        await self.reply_text(evt, "\n".join(lines))

    def chat_line(self, room: ChatRoomRow, here: str) -> str:
        line = self.notices.text(
            "chats.line", name=f"**{room.name}**", chat_id=room.chat_id,
            link=matrix_to(room.room_id, self.server_name), agent=room.agent_id,
        )  # fmt: skip
        if room.room_id == here:
            line += " " + self.notices.text("chats.current")
        return line

    @command.new("rename", help="Rename this chat: !rename <name>")
    @command.argument("name", pass_raw=True, required=False)
    @chat_owner
    async def rename(self, evt: MessageEvent, room: ChatRoomRow, name: str = "") -> None:
        new_name = await self.valid_name(evt, name, "!rename Research")
        if new_name is None:
            return
        renamed = await self.on_homeserver(evt, "!rename", self.spaces.rename(room, new_name))
        if renamed is not None:
            await self.reply(evt, "renamed", name=renamed.name)

    @command.new("encrypt", help="End-to-end encrypt this chat: !encrypt --confirm")
    @command.argument("flags", pass_raw=True, required=False)
    @chat_owner
    async def encrypt(self, evt: MessageEvent, room: ChatRoomRow, flags: str = "") -> None:
        crypto = self.spaces.mx.crypto
        if not crypto.available:
            await self.reply(evt, "encrypt.unavailable")
        elif await crypto.is_encrypted(room.room_id):
            await self.reply(evt, "encrypt.already")
        elif "--confirm" not in (flags or "").split():
            await self.reply(evt, "encrypt.confirm")
        elif await self.on_homeserver(evt, "!encrypt", self.spaces.encrypt(room)) is not None:
            await self.reply(evt, "encrypt.done")

    @command.new("archive", help="Archive this chat (history kept)", must_consume_args=False)
    @chat_owner
    async def archive(self, evt: MessageEvent, room: ChatRoomRow) -> None:
        await self._set_archived(evt, room, True)

    @command.new("unarchive", help="Bring this chat back into your Space", must_consume_args=False)
    @chat_owner
    async def unarchive(self, evt: MessageEvent, room: ChatRoomRow) -> None:
        await self._set_archived(evt, room, False)

    async def _set_archived(self, evt: MessageEvent, room: ChatRoomRow, archived: bool) -> None:
        if room.archived == archived:
            await self.reply(evt, "already_archived" if archived else "not_archived")
            return
        changed = await self.on_homeserver(
            evt, "Archive change", self.spaces.set_archived(room, archived)
        )
        if changed is not None:
            await self.reply(evt, "archived" if archived else "unarchived", name=changed.name)
