"""The conversation of a chat: !clear, !save, !load, !context, !agent, !cancel, !retry."""

from __future__ import annotations

import asyncio

from maubot import MessageEvent
from maubot.handlers import command

from ..agents import Agent, AgentError
from ..db import ChatRoomRow, SnapshotRow, now_ms
from ..roomstate import clean_name, new_platform_chat_id
from ..texts import text
from .base import CommandBase

SNAPSHOT_NAME_MAX = 64


class ContextCommands(CommandBase):
    def agent_error(self, error: AgentError) -> str:
        return text(self.bot.settings.language, error.key, **error.values)

    async def snapshot_name(self, evt: MessageEvent, raw: str, example: str) -> str | None:
        name = clean_name(raw or "")
        if not name or len(name) > SNAPSHOT_NAME_MAX:
            await self.reply(evt, "snapshot.name_bad", max=SNAPSHOT_NAME_MAX, example=example)
            return None
        return name

    async def snapshot_names(self, user_id: str) -> str:
        snaps = await self.bot.store.snapshots_of(user_id)
        return ", ".join(f"`{s.name}`" for s in snaps) or text(self.bot.settings.language, "none")

    async def current_agent(
        self, evt: MessageEvent, room_id: str
    ) -> tuple[ChatRoomRow, Agent | None]:
        """The room as it is now (in its turn) and its agent; None after saying it is gone."""
        current = self.bot.registry.room(room_id)
        agent = self.bot.router.agents.get(current.agent_id)
        if agent is None:
            await self.reply(evt, "agent.unknown", agent=current.agent_id)
        return current, agent

    async def switch_conversation(self, room: ChatRoomRow, platform_chat_id: str) -> ChatRoomRow:
        """Points the room at another conversation: database, memory and the room's marker."""
        room = await self.bot.registry.update_room(room.room_id, platform_chat_id=platform_chat_id)
        await self.bot.spaces.write_marker(room, self.bot.registry.users[room.user_id].space_id)
        return room

    @command.new("clear", help="Start this chat's conversation afresh")
    async def clear(self, evt: MessageEvent) -> None:
        async with self.bot.router.in_turn(evt.room_id) as turn:
            await self._clear(evt, turn)

    async def _clear(self, evt: MessageEvent, turn: asyncio.Future) -> None:
        if not await self.begin(evt) or not (room := await self.owned_chat(evt)):
            return

        async def run() -> None:
            current = self.bot.registry.room(room.room_id)
            old = current.platform_chat_id
            fresh = await self.switch_conversation(current, new_platform_chat_id())
            self.bot.log.info("Cleared %s: %s -> %s", room.room_id, old, fresh.platform_chat_id)
            agent = self.bot.router.agents.get(current.agent_id)
            if agent is not None:
                try:
                    await agent.drop(old)
                except AgentError as e:
                    self.bot.log.warning("Dropping %s upstream failed: %s", old, e)
                    await self.reply(evt, "clear.upstream_failed", error=self.agent_error(e))
            await self.reply(evt, "clear.done", pcid=fresh.platform_chat_id)

        turn.set_result(run)

    @command.new("save", help="Save this conversation as a snapshot: !save <name>")
    @command.argument("name", pass_raw=True, required=False)
    async def save(self, evt: MessageEvent, name: str = "") -> None:
        async with self.bot.router.in_turn(evt.room_id) as turn:
            await self._save(evt, turn, name)

    async def _save(self, evt: MessageEvent, turn: asyncio.Future, name: str) -> None:
        if not await self.begin(evt) or not (room := await self.owned_chat(evt)):
            return
        if not (snapshot_name := await self.snapshot_name(evt, name, "!save draft")):
            return

        async def run() -> None:
            current, agent = await self.current_agent(evt, room.room_id)
            if agent is None:
                return
            try:
                data = await agent.snapshot(current.platform_chat_id)
            except AgentError as e:
                self.bot.log.warning("Snapshot of %s failed: %s", current.platform_chat_id, e)
                await self.reply(evt, "agent.error", error=self.agent_error(e))
                return
            await self.bot.store.save_snapshot(
                SnapshotRow(
                    evt.sender,
                    snapshot_name,
                    current.agent_id,
                    current.platform_chat_id,
                    data,
                    now_ms(),
                )
            )
            await self.reply(evt, "save.done", name=snapshot_name)

        turn.set_result(run)

    @command.new("load", help="Continue this chat from a snapshot: !load <name>")
    @command.argument("name", pass_raw=True, required=False)
    async def load(self, evt: MessageEvent, name: str = "") -> None:
        async with self.bot.router.in_turn(evt.room_id) as turn:
            await self._load(evt, turn, name)

    async def _load(self, evt: MessageEvent, turn: asyncio.Future, name: str) -> None:
        if not await self.begin(evt) or not (room := await self.owned_chat(evt)):
            return
        if not (snapshot_name := await self.snapshot_name(evt, name, "!load draft")):
            return
        snap = await self.bot.store.get_snapshot(evt.sender, snapshot_name)
        if snap is None:
            names = await self.snapshot_names(evt.sender)
            key = (
                "load.unknown" if names != text(self.bot.settings.language, "none") else "load.none"
            )
            await self.reply(evt, key, name=snapshot_name, names=names)
            return

        async def run() -> None:
            current, agent = await self.current_agent(evt, room.room_id)
            if agent is None:
                return
            fresh_id = new_platform_chat_id()
            try:
                await agent.restore(fresh_id, snap.messages)
            except AgentError as e:
                self.bot.log.warning("Restoring snapshot %s failed: %s", snap.name, e)
                await self.reply(evt, "agent.error", error=self.agent_error(e))
                return
            fresh = await self.switch_conversation(current, fresh_id)
            self.bot.log.info("Loaded snapshot %s into %s as %s", snap.name, room.room_id, fresh_id)
            await self.reply(evt, "load.done", name=snap.name, pcid=fresh.platform_chat_id)

        turn.set_result(run)

    @command.new("context", help="This chat's agent, id, size and your snapshots")
    async def context(self, evt: MessageEvent) -> None:
        if not await self.begin(evt) or not (room := await self.owned_chat(evt)):
            return
        lang = self.bot.settings.language
        lines = [text(lang, "context.title")]
        agent = self.bot.router.agents.get(room.agent_id)
        messages: object = "?"
        chars = 0
        error = None
        if agent is None:
            error = text(lang, "agent.unknown", agent=room.agent_id)
        else:
            try:
                info = await agent.context(room.platform_chat_id)
                messages, chars = info.messages, info.chars
            except AgentError as e:
                error = self.agent_error(e)
        lines.append(
            text(
                lang,
                "context.body",
                agent=room.agent_id,
                pcid=room.platform_chat_id,
                messages=messages,
                chars=chars,
                tokens=(chars + 3) // 4,  # the usual rough estimate: four characters a token
                snapshots=await self.snapshot_names(evt.sender),
            )
        )
        if error:
            lines.append(text(lang, "context.unavailable", error=error))
        await self.bot.notify(evt.room_id, "\n".join(lines))

    @command.new("agent", help="Show or switch this chat's agent: !agent [id]")
    @command.argument("agent_id", pass_raw=True, required=False)
    async def agent(self, evt: MessageEvent, agent_id: str = "") -> None:
        async with self.bot.router.in_turn(evt.room_id) as turn:
            await self._agent(evt, turn, agent_id)

    async def _agent(self, evt: MessageEvent, turn: asyncio.Future, agent_id: str) -> None:
        if not await self.begin(evt) or not (room := await self.owned_chat(evt)):
            return
        agents = ", ".join(f"`{a}`" for a in self.bot.settings.agents)
        wanted = (agent_id or "").strip()
        if not wanted:
            await self.reply(evt, "agent.current", agent=room.agent_id, agents=agents)
            return
        if wanted not in self.bot.settings.agents:
            await self.reply(evt, "agent.unknown_id", agent=wanted[:64], agents=agents)
            return

        async def run() -> None:
            current = self.bot.registry.room(room.room_id)
            updated = await self.bot.registry.update_room(current.room_id, agent_id=wanted)
            space_id = self.bot.registry.users[current.user_id].space_id
            await self.bot.spaces.write_marker(updated, space_id)
            self.bot.log.info("Chat %s switched to agent %s", room.room_id, wanted)
            await self.reply(evt, "agent.switched", agent=wanted)

        turn.set_result(run)

    @command.new("cancel", help="Stop the running answer")
    async def cancel(self, evt: MessageEvent) -> None:
        if not await self.begin(evt) or not (room := await self.owned_chat(evt)):
            return
        worker = self.bot.router.workers.get(room.room_id)
        if worker is None or not worker.cancel():
            await self.reply(evt, "cancel.nothing")

    @command.new("retry", help="Send the last unanswered message again")
    async def retry(self, evt: MessageEvent) -> None:
        if not await self.begin(evt) or not (room := await self.owned_chat(evt)):
            return
        worker = self.bot.router.workers.get(room.room_id)
        if worker is None or worker.unanswered is None:
            await self.reply(evt, "retry.nothing")
            return
        await self.reply(evt, "retry.again")
        worker.retry()
