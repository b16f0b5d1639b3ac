"""The stage a room's queue hands each message to, in the room's turn: policy, then the
file, then the answer. Also what the room says when a message is cancelled or unknown."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .agents import AgentRequest, Agents
from .answering import Answerer
from .attachments import FileService
from .config import Settings
from .db import Store
from .files import caption
from .gate import StartGate
from .intake import Incoming
from .matrix import Matrix
from .notices import Notices
from .policy import Admission, RateLimiter, admit, refusal
from .queue import Outcome
from .registry import Registry
from .roomstate import matrix_to

POINTER_EVERY_S = 3600  # at most one "your chats are in your Space" per room and hour


class Conversation:
    def __init__(
        self,
        *,
        gate: StartGate,
        store: Store,
        registry: Registry,
        agents: Agents,
        answerer: Answerer,
        files: FileService,
        notices: Notices,
        mx: Matrix,
        settings: Callable[[], Settings],
        log: logging.Logger,
    ) -> None:
        self.gate = gate
        self.store = store
        self.registry = registry
        self.agents = agents
        self.answerer = answerer
        self.files = files
        self.notices = notices
        self.mx = mx
        self.settings = settings
        self.log = log
        self.rate = RateLimiter(lambda: self.settings().requests_per_minute)
        self._pointed: dict[str, float] = {}

    async def message(self, room_id: str, incoming: Incoming, retried: bool) -> Outcome:
        """Decides what a message gets, in the order the room's messages arrived."""
        if not await self.gate.wait():
            return Outcome.SKIPPED
        settings = self.settings()
        room = self.registry.room(room_id)
        admission = admit(room, incoming.sender, settings)
        if admission is Admission.POINT:
            await self.point_to_space(room_id, incoming.sender)
        if room is None or admission is not Admission.TAKE:
            return Outcome.SKIPPED
        if not retried and not await self.store.mark_handled(incoming.event_id, room_id):
            return Outcome.SKIPPED  # already answered (a redelivery, or caught up after a restart)
        if reason := refusal(room, len(incoming.body), settings):
            await self.notices.say(room_id, reason[0], **reason[1])
            return Outcome.SKIPPED
        if not self.rate.allow(incoming.sender):
            await self.notices.say(
                room_id, "message.too_fast", per_minute=settings.requests_per_minute
            )
            return Outcome.KEEP
        return await self._answer(room_id, incoming)

    async def _answer(self, room_id: str, incoming: Incoming) -> Outcome:
        room = self.registry.room(room_id)
        if room is None or room.gone:
            return Outcome.SKIPPED
        agent = self.agents.get(room.agent_id)
        if agent is None:
            await self.notices.say(room_id, "agent.unknown", agent=room.agent_id)
            return Outcome.KEEP
        body, attachments = incoming.body, ()
        if incoming.file is not None:
            attachment = await self.files.take(room_id, incoming, agent)
            if attachment is None:
                return Outcome.SKIPPED  # refused, and the user told why
            body, attachments = caption(incoming.file), (attachment,)
        request = AgentRequest(room.platform_chat_id, body, incoming.sender, attachments)
        answered = await self.answerer.answer(room, agent, request)
        return Outcome.ANSWERED if answered else Outcome.KEEP

    async def cancelled(self, room_id: str, incoming: Incoming) -> None:
        await self.notices.say(room_id, "cancelled")

    async def interrupted(self, incoming: Incoming) -> None:
        # Not answered after all: the next start's catch-up must see it as new.
        await self.store.unmark_handled(incoming.event_id)

    async def unknown_command(self, incoming: Incoming) -> None:
        if not await self.gate.wait():
            return
        if await self.store.mark_handled(incoming.event_id, incoming.room_id):
            await self.notices.say(
                incoming.room_id, "command.unknown", command=f"!{incoming.command[:32]}"
            )

    async def point_to_space(self, room_id: str, sender: str) -> None:
        user = self.registry.users.get(sender)
        if user is None or not user.space_id:
            return
        now = time.monotonic()
        if now - self._pointed.get(room_id, -POINTER_EVERY_S) < POINTER_EVERY_S:
            return
        self._pointed = {r: t for r, t in self._pointed.items() if now - t < POINTER_EVERY_S}
        self._pointed[room_id] = now
        link = matrix_to(user.space_id, self.mx.server_name)
        await self.notices.say(room_id, "pointer", link=link)
