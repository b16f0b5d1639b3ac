"""Chat management: !new, !chats, !rename, !archive, !unarchive."""

from __future__ import annotations

from maubot import MessageEvent
from maubot.handlers import command

from ..agents import AgentError
from ..matrix import HomeserverError
from ..roomstate import NAME_MAX, clean_name, matrix_to, new_platform_chat_id
from ..spaces import TooManyChats
from ..texts import text
from .base import CommandBase


class ChatCommands(CommandBase):
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
    async def new(self, evt: MessageEvent, args: str = "") -> None:
        if not await self.begin(evt):
            return
        if not await self.allowed(evt):
            return
        name, _, snapshot_name = f" {args or ''} ".partition(" --from ")
        wanted = None
        if name.strip():
            wanted = await self.valid_name(evt, name, "!new Research")
            if wanted is None:
                return
        agent_id = platform_chat_id = None
        if _:
            fork = await self.fork(evt, snapshot_name)
            if fork is None:
                return
            agent_id, platform_chat_id = fork
        try:
            room = await self.bot.spaces.new_chat(evt.sender, wanted, agent_id, platform_chat_id)
        except TooManyChats:
            await self.reply(evt, "new.too_many", max=self.bot.settings.max_chats_per_user)
            return
        except HomeserverError as e:
            self.bot.log.warning("!new for %s failed: %s", evt.sender, e)
            await self.reply(evt, "error.homeserver")
            return
        await self.reply(
            evt,
            "new.created",
            name=room.name,
            link=matrix_to(room.room_id, self.bot.mx.server_name),
        )

    async def fork(self, evt: MessageEvent, raw_name: str) -> tuple[str, str] | None:
        """A new conversation restored from a snapshot: (agent id, platform_chat_id)."""
        name = clean_name(raw_name)
        snap = await self.bot.store.get_snapshot(evt.sender, name) if name else None
        if snap is None:
            snaps = await self.bot.store.snapshots_of(evt.sender)
            names = ", ".join(f"`{s.name}`" for s in snaps)
            await self.reply(
                evt,
                "new.from_unknown",
                name=name[:64],
                names=names or text(self.bot.settings.language, "none"),
            )
            return None
        agent_id = snap.agent_id
        if agent_id not in self.bot.router.agents:
            agent_id = self.bot.settings.default_agent
        platform_chat_id = new_platform_chat_id()
        try:
            await self.bot.router.agents[agent_id].restore(platform_chat_id, snap.messages)
        except AgentError as e:
            self.bot.log.warning("Forking snapshot %s failed: %s", name, e)
            message = text(self.bot.settings.language, e.key, **e.values)
            await self.reply(evt, "agent.error", error=message)
            return None
        return agent_id, platform_chat_id

    @command.new("chats", help="Your chats: !chats [archived]")
    @command.argument("which", pass_raw=True, required=False)
    async def chats(self, evt: MessageEvent, which: str = "") -> None:
        if not await self.begin(evt):
            return
        if not await self.allowed(evt):
            return
        which = (which or "").strip().lower()
        if which not in ("", "archived"):
            await self.reply(evt, "chats.usage")
            return
        archived = which == "archived"
        rooms = [
            r
            for r in self.bot.registry.rooms_of(evt.sender)
            if not r.gone and r.archived == archived
        ]
        lang = self.bot.settings.language
        if not rooms:
            await self.reply(evt, "chats.none_archived" if archived else "chats.none")
            return
        lines = [text(lang, "chats.archived_title" if archived else "chats.title")]
        for room in rooms:
            line = text(
                lang,
                "chats.line",
                name=f"**{room.name}**",
                chat_id=room.chat_id,
                link=matrix_to(room.room_id, self.bot.mx.server_name),
                agent=room.agent_id,
            )
            if room.room_id == evt.room_id:
                line += " " + text(lang, "chats.current")
            lines.append(f"- {line}")
        await self.bot.notify(evt.room_id, "\n".join(lines))

    @command.new("rename", help="Rename this chat: !rename <name>")
    @command.argument("name", pass_raw=True, required=False)
    async def rename(self, evt: MessageEvent, name: str = "") -> None:
        if not await self.begin(evt):
            return
        room = await self.owned_chat(evt)
        if room is None:
            return
        new_name = await self.valid_name(evt, name, "!rename Research")
        if new_name is None:
            return
        try:
            room = await self.bot.spaces.rename(room, new_name)
        except HomeserverError as e:
            self.bot.log.warning("!rename in %s failed: %s", evt.room_id, e)
            await self.reply(evt, "error.homeserver")
            return
        await self.reply(evt, "renamed", name=room.name)

    @command.new("archive", help="Archive this chat (history kept)")
    async def archive(self, evt: MessageEvent) -> None:
        await self._set_archived(evt, True)

    @command.new("unarchive", help="Bring this chat back into your Space")
    async def unarchive(self, evt: MessageEvent) -> None:
        await self._set_archived(evt, False)

    async def _set_archived(self, evt: MessageEvent, archived: bool) -> None:
        if not await self.begin(evt):
            return
        room = await self.owned_chat(evt)
        if room is None:
            return
        if room.archived == archived:
            await self.reply(evt, "already_archived" if archived else "not_archived")
            return
        try:
            room = await self.bot.spaces.set_archived(room, archived)
        except HomeserverError as e:
            self.bot.log.warning("Archive change in %s failed: %s", evt.room_id, e)
            await self.reply(evt, "error.homeserver")
            return
        await self.reply(evt, "archived" if archived else "unarchived", name=room.name)
