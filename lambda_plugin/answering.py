"""Answering: one message to the room's agent, the answer streamed back into the room.

Typing notifications run while the agent works (only for answers slower than half a
second: each costs the homeserver a wake-up of every sync). An agent's failure becomes one
short notice; the caller keeps the message for !retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass

from . import files
from .agents import Agent, AgentError, AgentReply, AgentRequest, Agents, Attachment, Usage
from .attachments import FileService
from .db import ChatRoomRow
from .db.places import FilePlaceTable
from .files import caption
from .intake import ANSWERING, Incoming
from .ledger import Fate, Ledger
from .matrix import HomeserverError, Matrix, new_txn
from .notices import Notices, answering
from .part import Part
from .quotes import quoted_text, with_quote
from .registry import Registry
from .replies import StreamingReply, notice_content
from .usage import Quota, estimate
from .voice import Voice, is_voice


@dataclass(eq=False, kw_only=True)
class Answerer(Part):
    """The answer stage: the message (and its file) to the room's agent, the answer back."""

    mx: Matrix
    registry: Registry
    agents: Agents
    files: FileService
    notices: Notices
    voice: Voice
    quota: Quota
    ledger: Ledger
    places: FilePlaceTable | None = None  # where files landed: a reply to one names it

    async def answer(self, room_id: str, incoming: Incoming) -> tuple[Fate, str]:
        """Hands the message (and its file) to the room's agent and sends the answer; the
        message's fate and why: answered, kept after telling the user it failed (for
        !retry), refused (the file refused and the user told why), left (the room is gone)."""
        room = self.registry.room(room_id)
        if room is None or room.gone:
            return Fate.LEFT, "gone"
        agent = self.agents.get(room.agent_id)
        if agent is None:
            await self.notices.note(
                room_id, "agent.unknown", agent=room.agent_id, reply_to=incoming.event_id
            )
            return Fate.KEPT, "agent"
        try:
            request = await self._request(room, agent, incoming)
        except AgentError as error:  # the voice message's transcription failed
            await self._agent_failed(room, agent, error, incoming.event_id)
            return Fate.KEPT, "agent"
        if request is None:
            return Fate.REFUSED, "file"
        return await self.ask(room, agent, request, incoming)

    async def _request(
        self, room: ChatRoomRow, agent: Agent, incoming: Incoming
    ) -> AgentRequest | None:
        """What the agent is asked: the text, a voice message's transcript, a file (into the
        workspace, or inline); None after telling the user why a file was refused."""
        body, attachments = incoming.body, tuple[Attachment, ...]()
        spec = self.settings().transcription_for(room.agent_id) if is_voice(incoming) else None
        if spec is not None:
            try:
                body = await self.voice.transcript(incoming, spec)
            except files.FileRefused as e:
                await self.notices.send(
                    room.room_id, e.message(self.settings().language), reply_to=incoming.event_id
                )
                return None
        if incoming.file is not None and (spec is None or self.settings().workspace_root):
            attachment = await self.files.take(room.room_id, incoming, agent)
            if attachment is None:
                return None
            body = body if spec is not None else caption(incoming.file)
            attachments = (attachment,)
        if incoming.reply_to and incoming.file is None:
            body = with_quote(body, await self._quote(room.room_id, incoming.reply_to))
        return AgentRequest(
            room.platform_chat_id, body, incoming.sender, attachments, incoming.event_id,
            replaces=incoming.replaces,
        )

    async def _quote(self, room_id: str, reply_to: str) -> str:
        """The event replied to, quoted; a file's workspace path only while a workspace is
        set (without one, the agent can't open it)."""
        settings = self.settings()
        places = self.places if settings.workspace_root else None
        return await quoted_text(
            self.mx, room_id, reply_to, settings.max_quote_chars, self.log, places
        )

    async def ask(
        self, room: ChatRoomRow, agent: Agent, request: AgentRequest, incoming: Incoming
    ) -> tuple[Fate, str]:
        """Asks the agent (the message taken, in the ledger) and sends its answer, marked as
        the answer to the message; an unfinished answer of an earlier attempt is finished in
        place. Kept after telling the user it failed."""
        reply = self._reply(room.room_id, incoming)
        await self.ledger.taken(incoming.event_id)
        try:
            async with _Typing(self.mx, room.room_id, self.log):
                answer = await agent.respond(request, reply.partial)
        except BaseException as error:
            await self._cut(room, request, reply, error)
            if isinstance(error, AgentError):
                await self._agent_failed(room, agent, error, incoming.event_id)
            elif isinstance(error, Exception):
                self.log.error("Answering in %s failed", room.room_id, exc_info=error)
                await self._failed(room.room_id, self.notices.text("agent.failed"), incoming.event_id)
            else:
                raise  # cancelled: by !cancel (kept) or a stop (answered at the next start)
            return Fate.KEPT, "agent"
        try:
            fate = await self._deliver(room, reply, answer, (incoming.event_id, request.user_id))
            if fate[0] is Fate.ANSWERED:  # done, whatever cancels it now
                self.ledger.delivered(incoming.event_id, reply.first_piece)
            return fate
        finally:  # spent once the agent answered, whether or not the answer reaches the room;
            # written after the send, which it must not delay
            await self._record(request.user_id, room.room_id, answer.usage)

    async def _record(self, user_id: str, room_id: str, usage: Usage | None) -> None:
        """Counts an answer's usage; a database that fails now costs the count, never the
        answer (logged)."""
        try:
            await self.quota.record(user_id, room_id, usage)
        except Exception as e:
            self.log.warning("Counting the usage of an answer in %s failed: %s", room_id, e)

    def _reply(self, room_id: str, incoming: Incoming) -> StreamingReply:
        # Partials are not the answer yet: only what finishes it names the message.
        mark = functools.partial(answering, reply_to=incoming.event_id, field=ANSWERING)
        first_txn = new_txn()  # every try of the stream's first event: one event at most

        async def send_first(content: dict, wait: bool = False) -> str:
            return await self.mx.send(room_id, mark(content), wait_outage=wait, txn=first_txn)

        async def send_partial(content: dict) -> str:
            if reply.event_id is None:
                return await send_first(content)
            return await self.mx.send(room_id, mark(content), wait_outage=False)

        reply = StreamingReply(
            lambda content: self.mx.send(room_id, mark(content)),
            self.settings().stream_edit_interval_s,
            send_partial=send_partial,
            send_first=lambda content: send_first(content, wait=True),
            resume=incoming.resume,
            resumes_finished=bool(incoming.resume and incoming.replaces),  # an edit, a 🔁
            started=lambda event_id: self.ledger.answer_started(incoming.event_id, event_id),
            # Measured as sent: the encrypted event in an encrypted room.
            encrypted=lambda: self.mx.crypto.must_seal(room_id),
        )
        return reply

    async def _cut(
        self, room: ChatRoomRow, request: AgentRequest, reply: StreamingReply, error: BaseException
    ) -> None:
        """An answer that did not finish: what streamed of it is counted (estimated: the
        agent never said), and its message in the room marked as cut off."""
        if reply.streamed_chars:
            cost = estimate(len(request.text), reply.streamed_chars)
            await self._record(request.user_id, room.room_id, cost)
        await reply.interrupt(self.notices.text("answer.interrupted"))

    async def _agent_failed(
        self, room: ChatRoomRow, agent: Agent, error: AgentError, reply_to: str
    ) -> None:
        self.log.warning(
            "Agent %s failed in %s (%s): %s", agent.agent_id, room.room_id, room.chat_id, error
        )
        await self._failed(room.room_id, error.describe(self.settings().language), reply_to)

    async def _failed(self, room_id: str, error: str, reply_to: str) -> None:
        await self.notices.note(room_id, "agent.error", error=error, reply_to=reply_to)

    async def _deliver(
        self, room: ChatRoomRow, reply: StreamingReply, answer: AgentReply, to: tuple[str, str]
    ) -> tuple[Fate, str]:
        """The answer into the room, naming the message it answers; the agent's files from
        the requester's own folder. ``to``: (the message's event id, its sender)."""
        reply_to, requester = to
        working = functools.partial(answering, reply_to=reply_to, field=ANSWERING)
        reply.send = lambda content: self.mx.send(room.room_id, working(content))

        async def done(content: dict) -> str:  # what names the message answered
            return await self.mx.send(room.room_id, answering(content, reply_to))

        try:
            texts = bool(answer.text.strip() or not answer.attachments)
            if texts:
                await reply.finish(answer.text, None if answer.attachments else done)
            await self.files.send(room.room_id, requester, answer.attachments)
            if texts and answer.attachments:  # the text again, now naming the message
                await done(reply.edit_last())
            elif answer.attachments:  # files only: something in the room must name it
                text = self.notices.text("answer.files", count=len(answer.attachments))
                await done(notice_content(text))
        except Exception:
            self.log.exception("Sending the answer in %s failed", room.room_id)
            await reply.interrupt(self.notices.text("answer.interrupted"))
            with contextlib.suppress(HomeserverError):
                await self.notices.note(room.room_id, "send.failed", reply_to=reply_to)
            return Fate.KEPT, "send"
        return Fate.ANSWERED, ""


class _Typing:
    """Shows "typing" while its block runs, from half a second in; cleared at the end."""

    REFRESH_S = 20
    AFTER_S = 0.5

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
        await asyncio.sleep(self.AFTER_S)
        self.shown = True
        while True:
            await self._set(True)
            await asyncio.sleep(self.REFRESH_S)

    async def _set(self, on: bool) -> None:
        try:
            await self.mx.typing(self.room_id, on, timeout_ms=(self.REFRESH_S + 10) * 1000)
        except HomeserverError as e:
            self.log.debug("Typing notification in %s failed: %s", self.room_id, e)

