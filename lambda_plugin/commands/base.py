"""What every command class shares, and the preconditions commands declare.

A command handler is decorated with what it needs, outermost first:
``@in_turn`` (it reads or changes the chat or its conversation, so it runs in the room's
queue, between the right messages and commands), then one of ``@any_user`` / ``@allowed_user`` / ``@chat_owner`` / ``@admin``. Each
precondition first waits for the start gate and claims the event in the ledger (a redelivered
or caught-up command is never run twice); the ledger records it answered once it has run (in
its turn, for ``@in_turn``); a refusal is answered by the decorator.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from maubot import MessageEvent
from maubot.handlers.command import CommandHandler

from ..agents import Agent, Agents
from ..db import SnapshotRow, Store
from ..gate import StartGate
from ..intake import Incoming, Kind, as_json, classify, command_name
from ..ledger import Fate, Ledger
from ..matrix import HomeserverError
from ..notices import Notices
from ..part import Part, PartArgs
from ..policy import Admission, admit
from ..queue import QueueFull, RoomQueues
from ..registry import Registry
from ..replay import replaying
from ..replies import Verbatim, fit_count
from ..spaces import LIST_BYTES, chat_listing

Handler = Callable[..., Awaitable[Any]]
# Commands without arguments are made with must_consume_args=False: else maubot itself
# answers trailing words ("Usage: …"), past the gate, the access policy and the handled log.
NAMES_BYTES = 2_000
F = TypeVar("F", bound=Handler)
T = TypeVar("T")


class CommandArgs(PartArgs):
    """``CommandBase``'s fields, as keyword arguments for the wiring."""

    gate: StartGate
    store: Store
    ledger: Ledger
    notices: Notices


def command_of(evt: MessageEvent) -> Incoming:
    """The command as the ledger records it."""
    source = as_json(evt)
    found = classify(source, "")
    if found.kind is Kind.COMMAND:
        return found
    body = evt.content.body if isinstance(evt.content.body, str) else ""
    return Incoming(
        Kind.COMMAND, event_id=evt.event_id, room_id=evt.room_id, sender=evt.sender, body=body,
        timestamp=evt.timestamp or 0, command=command_name(body), source=source,
    )  # fmt: skip


@dataclass(eq=False, kw_only=True)
class CommandBase(Part):
    gate: StartGate
    store: Store
    ledger: Ledger
    notices: Notices

    async def begin(self, evt: MessageEvent) -> bool:
        """Waits until the plugin is ready; True when the command is this handler's to run
        (new, or left unfinished by a process that died)."""
        if not await self.gate.wait():
            return False
        return await self.ledger.claim(command_of(evt))

    async def ran(self, evt: MessageEvent, result: Any) -> Any:
        """Records the command answered once it has run; a command that runs in its turn
        (``result`` is what runs there) is recorded when that has run."""
        if not callable(result):
            await self.ledger.end(evt.event_id, Fate.ANSWERED)
            return result

        async def then() -> None:
            try:
                await result()
            except asyncio.CancelledError:
                # A stop while it ran: it may have acted already (a room made, a conversation
                # cleared), and run again at the next start it would act twice. Ended, not
                # released (one still waiting for its turn never got here: that one runs).
                await asyncio.shield(self.ledger.end(evt.event_id, Fate.ANSWERED, "stopped"))
                raise
            except Exception:
                await self.ledger.end(evt.event_id, Fate.ANSWERED, "failed")
                raise
            await self.ledger.end(evt.event_id, Fate.ANSWERED)

        return then

    async def reply(self, evt: MessageEvent, key: str, **values: object) -> None:
        await self.notices.say(evt.room_id, key, reply_to=evt.event_id, **values)

    async def reply_text(self, evt: MessageEvent, body: str, plain: str | None = None) -> None:
        """Answers with the Markdown ``body`` (``plain``: the plain body, where it differs)."""
        await self.notices.send(evt.room_id, body, reply_to=evt.event_id, plain=plain)

    async def snapshot_names(self, user_id: str) -> str:
        """The user's snapshots as a short list (it fits in any answer), or "none"."""
        snaps = await self.store.snapshot_names(user_id)
        # In code: a backtick of a name saved before names had none could end it.
        names = self.fitting([f"`{name.replace('`', chr(39))}`" for name in snaps], NAMES_BYTES)
        return ", ".join(names) or self.notices.text("none")

    async def read_snapshot(
        self, evt: MessageEvent, name: str, unknown: str, no_snapshots: str = ""
    ) -> SnapshotRow | None:
        """The user's snapshot ``name``, or None after telling them why not: they have none
        of that name (``unknown``; ``no_snapshots`` when they have none at all), or it is
        past history.max_snapshot_kb (saved before the bound): refused unread."""
        limit = self.settings().max_snapshot_bytes
        size = await self.store.snapshot_bytes(evt.sender, name) if name else None
        if size is not None and size > limit:
            await self.reply(
                evt, "snapshot.too_big", name=Verbatim(name), size=kb(size), max=kb(limit)
            )
            return None
        snap = None if size is None else await self.store.get_snapshot(evt.sender, name)
        if snap is None:
            names = await self.snapshot_names(evt.sender)
            key = no_snapshots if no_snapshots and names == self.notices.text("none") else unknown
            await self.reply(evt, key, name=Verbatim(name[:64]), names=names)
        return snap

    def fitting(self, lines: list[str], budget: int) -> list[str]:
        """The first of ``lines`` that fit ``budget`` bytes, and "… and N more" for the
        rest: a list answer always fits one event, however long the list grows."""
        kept = fit_count(lines, budget)
        if kept == len(lines):
            return lines
        return [*lines[:kept], self.notices.text("list.more", count=len(lines) - kept)]

    async def on_homeserver(self, evt: MessageEvent, what: str, call: Awaitable[T]) -> T | None:
        """What ``call`` returns, or None after the homeserver refused it (logged, and the
        user told: nothing else was changed)."""
        try:
            return await call
        except HomeserverError as e:
            self.log.warning("%s in %s failed: %s", what, evt.room_id, e)
            await self.reply(evt, "error.homeserver")
            return None


def kb(size: int) -> int:
    """A size in whole kilobytes, rounded up (as a limit's notice shows it)."""
    return -(-size // 1024)


def snapshot_agent(agents: Agents, snap: SnapshotRow, default_id: str) -> tuple[str, Agent | None]:
    """The agent a snapshot continues with: the one that made it, or (no longer configured)
    the default agent."""
    agent = agents.get(snap.agent_id)
    if agent is not None:
        return snap.agent_id, agent
    return default_id, agents.get(default_id)


def lenient(handler: CommandHandler) -> CommandHandler:
    """A subcommand whose trailing words are its own to judge: maubot never answers them
    with its own usage text (``subcommand`` has no ``must_consume_args``)."""
    handler.__mb_must_consume_args__ = False
    return handler


def _precondition(check: Callable[[Any, MessageEvent], Awaitable[tuple | None]]) -> Callable:
    """A decorator that runs ``check`` (after begin) and passes what it returns as extra
    leading arguments; None from ``check`` means refused (it answered the user itself)."""

    def decorator(func: F) -> F:
        @functools.wraps(func)
        async def wrapper(self: CommandBase, evt: MessageEvent, *args: Any, **kwargs: Any) -> Any:
            if not await self.begin(evt):
                return None
            try:
                extra = await check(self, evt)
                result = None if extra is None else await func(self, evt, *extra, *args, **kwargs)
            except asyncio.CancelledError:
                self.ledger.release(evt.event_id)
                raise
            except Exception:
                await self.ledger.end(evt.event_id, Fate.ANSWERED, "failed")
                raise
            return await self.ran(evt, result)

        return wrapper  # type: ignore[return-value]

    return decorator


async def _nothing(self: CommandBase, evt: MessageEvent) -> tuple:
    return ()


async def _refuse(self: CommandBase, evt: MessageEvent, key: str) -> None:
    """A refusal of someone the room is not theirs to use (a stranger, another member of
    someone's chat): said once a while to a sender in a room, not each time, so they can't
    make the bot flood the owner's room."""
    if self.notices.first_in_a_while(evt.room_id, evt.sender, key):
        await self.reply(evt, key)


async def _allowed(self: CommandBase, evt: MessageEvent) -> tuple | None:
    if evt.sender in self.settings().allowed_users:
        return ()
    await _refuse(self, evt, "refused")
    return None


async def _admin(self: CommandBase, evt: MessageEvent) -> tuple | None:
    if evt.sender in self.settings().admins:
        return ()
    await self.reply(evt, "admin.only")
    return None


async def _chat_owner(self: Any, evt: MessageEvent) -> tuple | None:
    room = self.registry.room(evt.room_id)
    if room is None or room.gone or room.user_id != evt.sender:
        await _not_a_chat(self, evt)
        return None
    return (room,)


async def _not_a_chat(self: Any, evt: MessageEvent) -> None:
    """Says the command works in a chat room; sent in the sender's own Space, with the list
    of their chats (never a link to the Space itself)."""
    registry: Registry = self.registry
    if registry.spaces.get(evt.room_id) != evt.sender:
        room = registry.room(evt.room_id)
        if room is not None and room.user_id != evt.sender:
            await _refuse(self, evt, "not_chat_room")  # another's chat: once a while
        else:
            await self.reply(evt, "not_chat_room")
        return
    rooms = registry.active_rooms_of(evt.sender)
    markdown, plain = chat_listing(self.notices, rooms, evt.room_id, LIST_BYTES)
    said = self.notices.text("not_chat_room")
    await self.reply_text(evt, f"{said}\n\n{markdown}", f"{said}\n\n{plain}")


any_user = _precondition(_nothing)
allowed_user = _precondition(_allowed)
admin = _precondition(_admin)
# The command is sent in a chat room by its owner; the handler gets the room's row.
# (The class has a ``registry``.)
chat_owner = _precondition(_chat_owner)


def in_turn(func: F) -> F:
    """Runs the handler in the room's turn: its place in the queue is taken before anything
    is awaited; what the handler returns (a coroutine function, or None) runs there. A
    replayed command (a missed one) is in its turn already: it runs at once. (The class
    has a ``queues`` and a ``registry``.)"""

    @functools.wraps(func)
    async def wrapper(self: Any, evt: MessageEvent, *args: Any, **kwargs: Any) -> None:
        if replaying(evt.event_id) or _not_the_rooms(self, evt):
            control = await func(self, evt, *args, **kwargs)
            if control is not None:
                await control()
            return
        queues: RoomQueues = self.queues
        try:
            async with queues.in_turn(evt.room_id, evt.event_id) as turn:
                turn.set_result(await func(self, evt, *args, **kwargs))
        except QueueFull as full:  # no place: the command was not taken, the user told
            await self.reply(evt, "queue.full", max=full.limit)

    return wrapper  # type: ignore[return-value]


def _not_the_rooms(commands: Any, evt: MessageEvent) -> bool:
    """A command in a chat room from someone it does not answer (another member with
    access.shared_rooms off, a stranger): it takes no place in the room's queue, where it
    would hold the owner's up; its precondition answers it at once."""
    if not commands.gate.is_open:
        return False
    room = commands.registry.room(evt.room_id)
    if room is None or room.user_id == evt.sender:
        return False  # the owner's go in turn, allowed or not (their precondition decides)
    return admit(room, evt.sender, commands.settings()) is Admission.IGNORE


def owner_in_turn(func: F) -> F:
    """Sent in a chat room by its owner, and changes the conversation: runs in turn."""
    return in_turn(chat_owner(func))
