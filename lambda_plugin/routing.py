"""Messages to agents: one worker per room, in order, never holding up another room."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from maubot import MessageEvent
from maubot.handlers import event
from mautrix.types import EventType, MessageType

from . import files
from .agents import Agent, AgentError, AgentRequest, Attachment
from .db import ChatRoomRow
from .matrix import HomeserverError
from .replies import StreamingReply
from .roomstate import matrix_to
from .texts import COMMAND_NAMES, text

if TYPE_CHECKING:
    from .bot import LambdaBot

TYPING_REFRESH_S = 20
TYPING_AFTER_S = 0.5
POINTER_EVERY_S = 3600  # at most one "your chats are in your Space" per room and hour
# mautrix's MessageType does not compare equal to strings: compare the values.
TEXT_TYPES = (MessageType.TEXT.value, MessageType.EMOTE.value)
ANSWERED_TYPES = (*TEXT_TYPES, *files.FILE_MSGTYPES)


@dataclass(frozen=True)
class Job:
    """A user's message waiting for its answer."""

    event_id: str
    sender: str
    text: str
    file: dict | None = None  # the content of a file message, until it is fetched
    attachments: tuple[Attachment, ...] = ()


Control = Callable[[], Awaitable[None]]
# What a room's queue holds: a message, or a command's slot, filled with what the command
# wants done in turn (or None) once it has checked its arguments.
QueueItem = Job | asyncio.Future


def filled_slot(control: Control) -> asyncio.Future:
    """A queue slot that already holds what to run (nothing to wait for)."""
    slot = asyncio.get_running_loop().create_future()
    slot.set_result(control)
    return slot


class RoomWorker:
    """Answers one room's messages one after another; commands that change the
    conversation run in the same queue, so they apply between the right messages."""

    def __init__(self, router: Router, room_id: str) -> None:
        self.router = router
        self.bot = router.bot
        self.room_id = room_id
        self.items: deque[QueueItem] = deque()
        self._wakeup = asyncio.Event()
        self.current: asyncio.Task | None = None
        self.current_job: Job | None = None
        self.typing_shown = False
        self.unanswered: Job | None = None  # the last message whose answer failed
        self.task = asyncio.create_task(self._run())

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.items)

    def push(self, item: QueueItem) -> None:
        self.items.append(item)
        self._wakeup.set()

    def push_front(self, jobs: list[Job]) -> None:
        """Puts caught-up messages (sent before anything queued now) at the head, in order."""
        self.items.extendleft(reversed(jobs))
        self._wakeup.set()

    def cancel(self) -> bool:
        if self.current is None or self.current.done():
            return False
        self.current.cancel()
        return True

    def retry(self) -> bool:
        """Answers the last unanswered message again, in turn; False when there is none."""
        job, self.unanswered = self.unanswered, None
        if job is None:
            return False
        self.push(filled_slot(lambda: self._answer(job)))  # already checked and marked handled
        return True

    async def stop(self) -> None:
        interrupted = self.current_job
        self.cancel()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if interrupted is not None:
            # Not answered after all: the next start's catch-up must see it as new.
            await self.bot.store.unmark_handled(interrupted.event_id)

    async def _run(self) -> None:
        while True:
            if not self.items:
                if (
                    self.router.workers.get(self.room_id) is self
                    and self.bot.ready.is_set()
                    and self.unanswered is None
                ):
                    # Idle: leave (no await between the check and the removal, so nothing
                    # can be queued here meanwhile); the next message makes a new worker.
                    del self.router.workers[self.room_id]
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item = self.items.popleft()
            try:
                if isinstance(item, Job):
                    await self._message(item)
                elif (control := await item) is not None:
                    await control()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.bot.log.exception("Handling a message in %s failed", self.room_id)

    async def _message(self, job: Job) -> None:
        """Decides what a message gets, in the order the room's messages arrived."""
        await self.bot.ready.wait()
        if self.bot.stopping:
            return
        settings = self.bot.settings
        room = self.bot.registry.room(self.room_id)
        if room is None or room.gone:
            await self.router.point_to_space(self.room_id, job.sender)
            return
        if job.sender != room.user_id and not settings.shared_rooms:
            return
        if job.sender not in settings.allowed_users:
            return
        if not await self.bot.store.mark_handled(job.event_id, self.room_id):
            return  # already answered (a redelivery, or caught up after a restart)
        lang = settings.language
        if room.archived:
            await self.bot.notify(self.room_id, text(lang, "archived.no_answer"))
            return
        if len(job.text) > settings.max_message_chars:
            await self.bot.notify(
                self.room_id, text(lang, "message.too_long", max=settings.max_message_chars)
            )
            return
        if not self.router.within_rate(job.sender):
            await self.bot.notify(
                self.room_id,
                text(lang, "message.too_fast", per_minute=settings.requests_per_minute),
            )
            self.unanswered = job
            return
        if job.file is not None:
            job = await self._fetch_file(job, room)
            if job is None:
                return
        await self._answer(job)

    async def _fetch_file(self, job: Job, room: ChatRoomRow) -> Job | None:
        """The job with its file fetched (into the workspace, or inline for agents that take
        files that way); None after telling the user why the file was refused."""
        settings = self.bot.settings
        content = job.file or {}
        agent = self.router.agents.get(room.agent_id)
        try:
            if settings.workspace_root:
                attachment = await files.save_incoming(
                    self.bot.mx,
                    settings.workspace_root,
                    job.sender,
                    self.room_id,
                    content,
                    settings.max_file_bytes,
                )
            elif agent is not None and agent.backend == "openai":
                attachment = await files.fetch_inline(self.bot.mx, content, settings.max_file_bytes)
            else:
                name = files.safe_name(str(content.get("filename") or content.get("body") or ""))
                await self.bot.notify(
                    self.room_id, text(settings.language, "file.not_accepted", name=name)
                )
                return None
        except files.FileRefused as e:
            self.bot.log.warning("File from %s in %s refused: %s", job.sender, self.room_id, e)
            await self.bot.notify(self.room_id, e.message(settings.language))
            return None
        self.bot.log.info(
            "Received file %s from %s in %s", attachment.workspace_path or attachment.name,
            job.sender, self.room_id,
        )  # fmt: skip
        return replace(job, text=files.caption(content), file=None, attachments=(attachment,))

    async def _answer(self, job: Job) -> None:
        room = self.bot.registry.room(self.room_id)
        if room is None or room.gone:
            return
        lang = self.bot.settings.language
        agent = self.router.agents.get(room.agent_id)
        if agent is None:
            self.unanswered = job
            await self.bot.notify(self.room_id, text(lang, "agent.unknown", agent=room.agent_id))
            return
        request = AgentRequest(room.platform_chat_id, job.text, job.sender, job.attachments)
        reply = StreamingReply(self._send, self.bot.settings.stream_edit_interval_s)
        self.typing_shown = False
        typing = asyncio.create_task(self._keep_typing())
        self.current_job = job
        self.current = asyncio.create_task(agent.respond(request, reply.partial))
        try:
            await asyncio.wait({self.current})
        finally:
            typing.cancel()
            await asyncio.gather(typing, return_exceptions=True)
            if self.typing_shown:
                await self._typing(False)
        call, self.current = self.current, None
        if call.cancelled():
            self.current_job = None
            self.unanswered = job
            await self.bot.notify(self.room_id, text(lang, "cancelled"))
            return
        error = call.exception()
        if isinstance(error, AgentError):
            self.current_job = None
            self.unanswered = job
            self.bot.log.warning(
                "Agent %s failed in %s (%s): %s", agent.agent_id, self.room_id, room.chat_id, error
            )
            message = text(lang, error.key, **error.values) if error.key else error.user_message
            await self.bot.notify(self.room_id, text(lang, "agent.error", error=message))
            return
        if error is not None:
            self.current_job = None
            self.unanswered = job
            self.bot.log.error(
                "Answering in %s failed", self.room_id, exc_info=(type(error), error, None)
            )
            await self.bot.notify(
                self.room_id, text(lang, "agent.error", error=text(lang, "agent.failed"))
            )
            return
        answer = call.result()
        try:
            if answer.text.strip() or not answer.attachments:
                await reply.finish(answer.text)
            await self._send_files(answer.attachments)
        except Exception:
            self.unanswered = job
            self.bot.log.exception("Sending the answer in %s failed", self.room_id)
            await self.bot.notify(self.room_id, text(lang, "send.failed"))
            return
        finally:
            self.current_job = None
        self.unanswered = None

    async def _send_files(self, paths: tuple[str, ...]) -> None:
        """Uploads the files the agent returned; each refusal is said, the rest still go."""
        settings = self.bot.settings
        for rel_path in paths:
            if not settings.workspace_root:
                await self.bot.notify(
                    self.room_id, text(settings.language, "file.missing", path=rel_path[:200])
                )
                continue
            try:
                await files.send_outgoing(
                    self.bot.mx, self.room_id, settings.workspace_root, rel_path,
                    settings.max_file_bytes,
                )  # fmt: skip
            except files.FileRefused as e:
                self.bot.log.warning("Agent file %r refused in %s: %s", rel_path, self.room_id, e)
                await self.bot.notify(self.room_id, e.message(settings.language))

    async def _send(self, content: dict) -> str:
        return await self.bot.mx.send(self.room_id, content)

    async def _keep_typing(self) -> None:
        # A quick answer needs no typing notice: each extra request costs the homeserver a
        # wake-up of every sync, and the answer itself says the message arrived.
        await asyncio.sleep(TYPING_AFTER_S)
        self.typing_shown = True
        while True:
            await self._typing(True)
            await asyncio.sleep(TYPING_REFRESH_S)

    async def _typing(self, on: bool) -> None:
        try:
            await self.bot.mx.typing(self.room_id, on, timeout_ms=(TYPING_REFRESH_S + 10) * 1000)
        except HomeserverError as e:
            self.bot.log.debug("Typing notification in %s failed: %s", self.room_id, e)


class Router:
    def __init__(self, bot: LambdaBot) -> None:
        self.bot = bot
        self.agents: dict[str, Agent] = {}
        self.workers: dict[str, RoomWorker] = {}
        self._pointed: dict[str, float] = {}
        self._recent: dict[str, deque[float]] = {}  # user -> times of their last requests

    def within_rate(self, user_id: str) -> bool:
        """Counts a request of the user; False past access.requests_per_minute."""
        now = time.monotonic()
        times = self._recent.setdefault(user_id, deque())
        while times and now - times[0] > 60:
            times.popleft()
        if len(times) >= self.bot.settings.requests_per_minute:
            return False
        times.append(now)
        return True

    def worker(self, room_id: str) -> RoomWorker:
        worker = self.workers.get(room_id)
        if worker is None:
            worker = self.workers[room_id] = RoomWorker(self, room_id)
        return worker

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers.values()))
        self.workers.clear()

    @asynccontextmanager
    async def in_turn(self, room_id: str) -> AsyncIterator[asyncio.Future]:
        """A place in the room's queue, taken at once (so in the order events arrived); the
        command sets the future's result to what should run there, or leaves it empty."""
        slot = asyncio.get_running_loop().create_future()
        self.worker(room_id).push(slot)
        try:
            yield slot
        finally:
            if not slot.done():
                slot.set_result(None)

    @event.on(EventType.ROOM_MESSAGE)
    async def on_message(self, evt: MessageEvent) -> None:
        if evt.sender == self.bot.client.mxid:
            return
        body = evt.content.body or ""
        job = self.job_for(evt)
        if job is not None:
            # Queued before the first await: handlers run as unordered tasks, and this keeps
            # the room's messages in the order they were dispatched.
            worker = self.worker(evt.room_id)
            waits = worker.busy
            worker.push(job)
            if waits and self.bot.ready.is_set():
                # It has to wait its turn: a read receipt shows the user it arrived.
                await self.bot.mx.receipt(evt.room_id, evt.event_id)
        elif (
            body.startswith("!")
            and getattr(evt.content.msgtype, "value", None) == MessageType.TEXT.value
            and not evt.content.get_edit()
        ):
            name = body[1:].split(maxsplit=1)[0].lower() if body[1:].strip() else ""
            if name not in COMMAND_NAMES:
                self.worker(evt.room_id).push(self._unknown_command(evt, name))

    def job_for(self, evt: MessageEvent) -> Job | None:
        """The job a message makes: None for the bot's own, edits, commands, other types."""
        msgtype = getattr(evt.content.msgtype, "value", evt.content.msgtype)
        if evt.sender == self.bot.client.mxid or msgtype not in ANSWERED_TYPES:
            return None
        if evt.content.get_edit():
            return None  # an edit of an earlier message, not a new one
        body = evt.content.body or ""
        is_file = msgtype in files.FILE_MSGTYPES
        if body.startswith("!") and not is_file:
            return None  # a command: the command handlers answer it
        return Job(evt.event_id, evt.sender, body, evt.content.serialize() if is_file else None)

    def _unknown_command(self, evt: MessageEvent, name: str) -> asyncio.Future:
        async def answer() -> None:
            await self.bot.ready.wait()
            if self.bot.stopping or not await self.bot.store.mark_handled(
                evt.event_id, evt.room_id
            ):
                return
            await self.bot.notify(
                evt.room_id,
                text(self.bot.settings.language, "command.unknown", command=f"!{name[:32]}"),
            )

        return filled_slot(answer)

    async def point_to_space(self, room_id: str, sender: str) -> None:
        user = self.bot.registry.users.get(sender)
        if user is None or not user.space_id:
            return
        now = time.monotonic()
        if now - self._pointed.get(room_id, -POINTER_EVERY_S) < POINTER_EVERY_S:
            return
        self._pointed = {r: t for r, t in self._pointed.items() if now - t < POINTER_EVERY_S}
        self._pointed[room_id] = now
        link = matrix_to(user.space_id, self.bot.mx.server_name)
        await self.bot.notify(room_id, text(self.bot.settings.language, "pointer", link=link))
