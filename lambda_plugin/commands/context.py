"""The conversation of a chat: !clear, !save, !load, !context, !agent, !cancel, !retry."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

from maubot import MessageEvent
from maubot.handlers import command
from maubot.handlers.command import CommandHandler

from ..agents import Agent, AgentError, Agents, ContextInfo
from ..chats import Chats
from ..db import ChatRoomRow, SnapshotRow, now_ms
from ..matrix import HomeserverError
from ..queue import Control, RoomQueues
from ..registry import Registry
from ..replies import Verbatim
from ..roomstate import clean_name, new_platform_chat_id
from ..spaces import chat_topic
from .base import CommandBase, Handler, chat_owner, kb, owner_in_turn, snapshot_agent

SNAPSHOT_NAME_MAX = 64


def snapshot_command(command_name: str, help: str) -> Callable[[Handler], CommandHandler]:
    """``!<name> <snapshot>``: a command on a snapshot of the user's, run in the room's turn
    for the chat's owner; the handler gets the snapshot's name, checked."""

    def decorator(func: Handler) -> CommandHandler:
        @functools.wraps(func)
        async def named(
            self: ContextCommands, evt: MessageEvent, room: ChatRoomRow, name: str = ""
        ) -> Control | None:
            snapshot = clean_name(name or "")
            # No backtick: a name is shown in code (`!load name`), which it must not end.
            if snapshot and len(snapshot) <= SNAPSHOT_NAME_MAX and "`" not in snapshot:
                return await func(self, evt, room, snapshot)
            await self.reply(
                evt, "snapshot.name_bad", max=SNAPSHOT_NAME_MAX, example=f"!{command_name} draft"
            )
            return None

        argument = command.argument("name", pass_raw=True, required=False)
        with_argument = argument(owner_in_turn(named))
        return command.new(command_name, help=help)(with_argument)

    return decorator


@dataclass(eq=False, kw_only=True)
class ContextCommands(CommandBase):
    """Commands on the conversation of the chat they are sent in."""

    registry: Registry
    chats: Chats
    agents: Agents
    queues: RoomQueues

    def agent_error(self, error: AgentError) -> str:
        return error.describe(self.settings().language)

    async def _drop(self, agent: Agent, platform_chat_id: str) -> AgentError | None:
        """Tells the agent side to drop a conversation the chat no longer uses."""
        try:
            await agent.drop(platform_chat_id)
        except AgentError as e:
            self.log.warning("Dropping %s upstream failed: %s", platform_chat_id, e)
            return e
        return None

    async def _room_for_snapshot(self, evt: MessageEvent, name: str) -> bool:
        """Whether the user may save ``name``: a new one within access.max_snapshots_per_user,
        or one that replaces a snapshot of the same name; else the user is told."""
        names = set(await self.store.snapshot_names(evt.sender))
        limit = self.settings().max_snapshots_per_user
        if name in names or len(names) < limit:
            return True
        await self.reply(evt, "save.too_many", max=limit)
        return False

    async def current_agent(self, evt: MessageEvent) -> tuple[ChatRoomRow, Agent | None]:
        """The room as it is now (in its turn) and its agent; None after saying it is gone."""
        current = self.registry.rooms[evt.room_id]
        agent = self.agents.get(current.agent_id)
        if agent is None:
            await self.reply(evt, "agent.unknown", agent=current.agent_id)
        return current, agent

    @command.new("clear", help="Start this chat's conversation afresh", must_consume_args=False)
    @owner_in_turn
    async def clear(self, evt: MessageEvent, room: ChatRoomRow) -> Control:
        async def run() -> None:
            old: list[str] = []

            async def rotate(current: ChatRoomRow) -> ChatRoomRow:
                old.append(current.platform_chat_id)
                return replace(current, platform_chat_id=new_platform_chat_id())

            fresh = await self.chats.change(room.room_id, rotate)
            assert fresh is not None
            self.log.info("Cleared %s: %s -> %s", room.room_id, old[0], fresh.platform_chat_id)
            agent = self.agents.get(fresh.agent_id)
            if agent is not None and (error := await self._drop(agent, old[0])):
                await self.reply(evt, "clear.upstream_failed", error=self.agent_error(error))
            await self.reply(evt, "clear.done", pcid=fresh.platform_chat_id)

        return run

    @snapshot_command("save", "Save this conversation as a snapshot: !save <name>")
    async def save(self, evt: MessageEvent, room: ChatRoomRow, snapshot_name: str) -> Control:
        async def run() -> None:
            if not await self._room_for_snapshot(evt, snapshot_name):
                return
            current, agent = await self.current_agent(evt)
            if agent is None:
                return
            try:
                data = await agent.snapshot(current.platform_chat_id)
            except AgentError as e:
                self.log.warning("Snapshot of %s failed: %s", current.platform_chat_id, e)
                await self.reply(evt, "agent.error", error=self.agent_error(e))
                return
            size, limit = len(data.encode()), self.settings().max_snapshot_bytes
            if size > limit:
                await self.reply(evt, "save.too_big", size=kb(size), max=kb(limit))
                return
            await self.store.save_snapshot(
                SnapshotRow(
                    evt.sender, snapshot_name, current.agent_id, current.platform_chat_id,
                    data, now_ms(),
                )
            )  # fmt: skip
            await self.reply(
                evt, "save.done", name=Verbatim(snapshot_name), command=f"!load {snapshot_name}"
            )

        return run

    @snapshot_command("load", "Continue this chat from a snapshot: !load <name>")
    async def load(self, evt: MessageEvent, room: ChatRoomRow, snapshot_name: str) -> Control:
        async def run() -> None:
            # In turn: a !save just before in this room has written it.
            snap = await self.read_snapshot(evt, snapshot_name, "load.unknown", "load.none")
            if snap is None:
                return
            agent_id, agent = snapshot_agent(self.agents, snap, self.settings().default_agent)
            if agent is None:
                await self.reply(evt, "agent.unknown", agent=agent_id)
                return
            fresh_id = new_platform_chat_id()
            try:
                await agent.restore(fresh_id, snap.messages)
            except AgentError as e:
                self.log.warning("Restoring snapshot %s failed: %s", snap.name, e)
                await self.reply(evt, "agent.error", error=self.agent_error(e))
                return
            old: list[ChatRoomRow] = []

            async def switch(current: ChatRoomRow) -> ChatRoomRow:
                old.append(current)
                return replace(current, platform_chat_id=fresh_id, agent_id=agent_id)

            if await self.on_homeserver(evt, "!load", self.chats.change(room.room_id, switch)) is None:
                await self._drop(agent, fresh_id)  # the room stays as it was: nothing left behind
                return
            self.log.info("Loaded snapshot %s into %s as %s", snap.name, room.room_id, fresh_id)
            replaced = self.agents.get(old[0].agent_id)
            if replaced is not None:  # replaced, as by !clear: its history goes
                await self._drop(replaced, old[0].platform_chat_id)
            if old[0].agent_id != agent_id:
                await self.retopic(room.room_id, agent_id)
            await self.reply(
                evt, "load.done", name=Verbatim(snap.name), agent=agent_id, pcid=fresh_id
            )

        return run

    @command.new("context", help="This chat's agent, id, size and your snapshots", must_consume_args=False)
    @owner_in_turn
    async def context(self, evt: MessageEvent, room: ChatRoomRow) -> Control:
        async def run() -> None:  # in turn: after the !clear, !load, !agent sent before it
            current = self.registry.room(room.room_id) or room
            await self.reply_text(evt, await self.context_text(evt, current))

        return run

    async def context_text(self, evt: MessageEvent, room: ChatRoomRow) -> str:
        agent = self.agents.get(room.agent_id)
        info = ContextInfo(messages=0, chars=0)
        error = None
        if agent is None:
            error = self.notices.text("agent.unknown", agent=room.agent_id)
        else:
            try:
                info = await agent.context(room.platform_chat_id)
            except AgentError as e:
                error = self.agent_error(e)
        lines = [
            self.notices.text("context.title"),
            self.notices.text(
                "context.body", agent=room.agent_id, pcid=room.platform_chat_id,
                messages="?" if error else info.messages, chars=info.chars,
                tokens=(info.chars + 3) // 4,  # the usual rough estimate: four characters a token
                snapshots=await self.snapshot_names(evt.sender),
            ),
        ]  # fmt: skip
        if info.pruned:
            lines.append(self.notices.text("context.pruned", count=info.pruned))
        if kept := len(await self.ledger.kept(room.room_id)):
            lines.append(self.notices.text("context.kept", count=kept))
        if error:
            lines.append(self.notices.text("context.unavailable", error=error))
        return "\n".join(lines)

    @command.new("agent", help="Show or switch this chat's agent: !agent [id]")
    @command.argument("agent_id", pass_raw=True, required=False)
    @owner_in_turn
    async def agent(
        self, evt: MessageEvent, room: ChatRoomRow, agent_id: str = ""
    ) -> Control | None:
        agents = ", ".join(f"`{a}`" for a in self.settings().agents)
        wanted = (agent_id or "").strip()
        if wanted and wanted not in self.settings().agents:
            await self.reply(evt, "agent.unknown_id", agent=wanted[:64], agents=agents)
            return None

        async def run() -> None:
            if not wanted:  # in turn: after an !agent or !load sent before it
                current = (self.registry.room(room.room_id) or room).agent_id
                await self.reply(evt, "agent.current", agent=current, agents=agents)
                return
            before = (self.registry.room(room.room_id) or room).agent_id
            await self.chats.update(room.room_id, agent_id=wanted)
            self.log.info("Chat %s switched to agent %s", room.room_id, wanted)
            if wanted != before:
                await self.retopic(room.room_id, wanted)
            await self.reply(evt, "agent.switched", agent=wanted)

        return run

    async def retopic(self, room_id: str, agent_id: str) -> None:
        """Sets the chat's topic to name its agent now; a topic the homeserver refuses is
        logged, and fails nothing (the switch is made)."""
        topic = {"topic": chat_topic(self.settings().language, agent_id)}
        try:
            await self.chats.mx.send_state(room_id, "m.room.topic", topic)
        except HomeserverError as e:
            self.log.warning("Could not set the topic of %s: %s", room_id, e)

    @command.new("cancel", help="Stop the running answer", must_consume_args=False)
    @chat_owner
    async def cancel(self, evt: MessageEvent, room: ChatRoomRow) -> None:
        if not self.queues.cancel(room.room_id):
            await self.reply(evt, "cancel.nothing")

    @command.new("retry", help="Send the kept messages again", must_consume_args=False)
    @chat_owner
    async def retry(self, evt: MessageEvent, room: ChatRoomRow) -> None:
        """Every kept message of the room (they survive restarts), oldest first, each
        through the same checks as a new one."""
        kept = await self.ledger.kept(room.room_id)
        if not kept:
            await self.reply(evt, "retry.nothing")
            return
        await self.reply(evt, "retry.again", count=len(kept))
        self.queues.retry(room.room_id, kept)
