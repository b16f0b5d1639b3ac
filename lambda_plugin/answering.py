"""Answering: one message to the room's agent, the answer streamed back into the room.

Typing notifications run while the agent works (only for answers slower than half a
second: each costs the homeserver a wake-up of every sync). An agent's failure becomes one
short notice; the caller keeps the message for !retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .agents import Agent, AgentError, AgentReply, AgentRequest
from .attachments import FileService
from .config import Settings
from .db import ChatRoomRow
from .matrix import HomeserverError, Matrix
from .notices import Notices
from .replies import StreamingReply

TYPING_REFRESH_S = 20
TYPING_AFTER_S = 0.5


class Answerer:
    def __init__(
        self,
        mx: Matrix,
        notices: Notices,
        files: FileService,
        settings: Callable[[], Settings],
        log: logging.Logger,
    ) -> None:
        self.mx = mx
        self.notices = notices
        self.files = files
        self.settings = settings
        self.log = log

    async def answer(self, room: ChatRoomRow, agent: Agent, request: AgentRequest) -> bool:
        """Asks the agent and sends its answer; False after telling the user it failed."""
        reply = StreamingReply(
            lambda content: self.mx.send(room.room_id, content),
            self.settings().stream_edit_interval_s,
        )
        try:
            async with _Typing(self.mx, room.room_id, self.log):
                answer = await agent.respond(request, reply.partial)
        except AgentError as error:
            self.log.warning(
                "Agent %s failed in %s (%s): %s", agent.agent_id, room.room_id, room.chat_id, error
            )
            await self._failed(room.room_id, error.describe(self.settings().language))
            return False
        except Exception as error:
            self.log.error("Answering in %s failed", room.room_id, exc_info=error)
            await self._failed(room.room_id, self.notices.text("agent.failed"))
            return False
        return await self._deliver(room, reply, answer)

    async def _failed(self, room_id: str, error: str) -> None:
        await self.notices.say(room_id, "agent.error", error=error)

    async def _deliver(self, room: ChatRoomRow, reply: StreamingReply, answer: AgentReply) -> bool:
        try:
            if answer.text.strip() or not answer.attachments:
                await reply.finish(answer.text)
            await self.files.send(room.room_id, room.user_id, answer.attachments)
        except Exception:
            self.log.exception("Sending the answer in %s failed", room.room_id)
            await self.notices.say(room.room_id, "send.failed")
            return False
        return True


class _Typing:
    """Shows "typing" while its block runs, from half a second in; cleared at the end."""

    def __init__(self, mx: Matrix, room_id: str, log: logging.Logger) -> None:
        self.mx = mx
        self.room_id = room_id
        self.log = log
        self.shown = False
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> None:
        self.task = asyncio.create_task(self._keep())

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if self.shown:
            await self._set(False)

    async def _keep(self) -> None:
        await asyncio.sleep(TYPING_AFTER_S)
        self.shown = True
        while True:
            await self._set(True)
            await asyncio.sleep(TYPING_REFRESH_S)

    async def _set(self, on: bool) -> None:
        try:
            await self.mx.typing(self.room_id, on, timeout_ms=(TYPING_REFRESH_S + 10) * 1000)
        except HomeserverError as e:
            self.log.debug("Typing notification in %s failed: %s", self.room_id, e)

