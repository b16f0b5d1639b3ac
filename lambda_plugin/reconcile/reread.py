"""Rooms whose state could not be read: what reading one again means, and the loop that does.

A joined room whose read failed at a reconciliation (a 500, a 502 or 429 after their tries)
is not gone: the plan leaves its row as it is (a room the database has no row for stays
unknown until read), the report lists it (``unreadable_rooms``), and ``Rereads`` reads it
again in the background, with a doubling wait and a bounded number of tries, until it
succeeds; then ``settle_room`` (pure) says what its row should be and
``Reconciler.reread`` writes that through ``Chats``, the one writer of a chat's row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from ..db import ChatRoomRow, UserRow, chat_number
from ..marker import KIND_CHAT, KIND_SPACE, Marker
from ..roomstate import RoomState, adopted_platform_chat_id
from .plan import restore_markers, trusted

REREAD_FIRST_S = 10.0  # the first try after the failed read
REREAD_MAX_S = 900.0  # the wait doubles up to this
REREAD_TRIES = 20  # then the room waits for the next start or !lambda reconcile (~3.5 h)
REREAD_AT_ONCE = 4


@dataclass(frozen=True)
class Settled:
    """What one room read again means: its chat row as it should be (None: nothing to
    write), the owner who gets it back as their Space, or a contradiction with another
    row (then nothing is written: a full reconciliation resolves it)."""

    row: ChatRoomRow | None = None
    space_owner: str | None = None
    conflict: bool = False


def settle_room(
    room: RoomState | None,
    room_id: str,
    bot_id: str,
    known_users: Mapping[str, UserRow],
    known_rooms: Mapping[str, ChatRoomRow],
    default_agent: str,
    now: int,
) -> Settled:
    """The plan's decisions for one room (``room`` None: the bot is not in it any more).
    Only the bot's trusted markers count; an unmarked room is left as it is (adopting one
    needs its Space's listing: the next full reconciliation)."""
    known = known_rooms.get(room_id)
    if room is None or room.tombstoned:
        return Settled(replace(known, gone=True)) if known and not known.gone else Settled()
    room = restore_markers({room_id: room}, bot_id, dict(known_users), dict(known_rooms))[room_id]
    marker = room.marker
    if marker is None or not trusted(room, bot_id):
        return Settled()
    if room.is_space and marker.kind == KIND_SPACE:
        return _settle_space(room_id, marker.owner, known_users)
    if room.is_space or marker.kind != KIND_CHAT:
        return Settled()
    return _settle_chat(room, marker, known, known_rooms, default_agent, now)


def _settle_space(room_id: str, owner: str, known_users: Mapping[str, UserRow]) -> Settled:
    user = known_users.get(owner)
    if user is not None and user.space_id:
        return Settled()  # the owner has their Space (this one, or one the database chose)
    if any(u.space_id == room_id for u in known_users.values()):
        return Settled(conflict=True)
    return Settled(space_owner=owner)


def _settle_chat(
    room: RoomState,
    marker: Marker,
    known: ChatRoomRow | None,
    known_rooms: Mapping[str, ChatRoomRow],
    default_agent: str,
    now: int,
) -> Settled:
    number = chat_number(marker.chat_id or "")
    chat_id = f"C{number}"
    pcid = marker.platform_chat_id or adopted_platform_chat_id(room.room_id)
    if number <= 0 or _taken(room.room_id, marker.owner, chat_id, pcid, known_rooms):
        return Settled(conflict=True)
    row = ChatRoomRow(
        room_id=room.room_id,
        user_id=marker.owner,
        chat_id=chat_id,
        name=room.name or (known.name if known else chat_id),
        agent_id=marker.agent_id or default_agent,
        platform_chat_id=pcid,
        archived=bool(marker.archived),
        gone=False,
        created_at=known.created_at if known else (room.created_ts or now),
    )
    return Settled() if row == known else Settled(row)


def _taken(
    room_id: str, owner: str, chat_id: str, pcid: str, known_rooms: Mapping[str, ChatRoomRow]
) -> bool:
    """Whether another room's row holds this chat number of the owner, or this id."""
    return any(
        r.room_id != room_id
        and ((r.user_id == owner and r.chat_id == chat_id) or r.platform_chat_id == pcid)
        for r in known_rooms.values()
    )


def backoff_s(tries: int, first_s: float, max_s: float) -> float:
    """The wait before try ``tries`` (1, 2, …): ``first_s``, doubling, at most ``max_s``."""
    return min(max_s, first_s * 2 ** min(max(tries - 1, 0), 60))


@dataclass(eq=False)
class _Due:
    at: float  # monotonic time of the next try
    tries: int = 0  # failed re-reads so far


class Rereads:
    """Rooms to read again, each on its own doubling wait, ``at_once`` at a time, each at
    most ``max_tries`` times; ``run()`` reads them until cancelled (the plugin's stop).
    ``read(room_id)`` raises while the room can't be read; it returns once it was settled."""

    def __init__(
        self,
        read: Callable[[str], Awaitable[None]],
        log: logging.Logger,
        first_s: float = REREAD_FIRST_S,
        max_s: float = REREAD_MAX_S,
        max_tries: int = REREAD_TRIES,
        at_once: int = REREAD_AT_ONCE,
    ) -> None:
        self.read, self.log = read, log
        self.first_s, self.max_s, self.max_tries, self.at_once = first_s, max_s, max_tries, at_once
        self._due: dict[str, _Due] = {}
        self._given_up: set[str] = set()
        self._wake = asyncio.Event()

    def pending(self) -> list[str]:
        return sorted(self._due)

    def given_up(self) -> list[str]:
        return sorted(self._given_up)

    def replace(self, room_ids: Iterable[str]) -> None:
        """The rooms a reconciliation could not read: the others were read, and are
        dropped; a room still waiting keeps its schedule, the rest are tried anew."""
        first = time.monotonic() + self.first_s
        self._due = {r: self._due.get(r) or _Due(first) for r in room_ids}
        self._given_up.clear()
        self._wake.set()

    async def run(self) -> None:
        limit = asyncio.Semaphore(self.at_once)
        while True:
            now = time.monotonic()
            due = [(room_id, d) for room_id, d in self._due.items() if d.at <= now]
            if due:
                await asyncio.gather(*(self._try(room_id, d, limit) for room_id, d in due))
            else:
                await self._until_due()

    async def _until_due(self) -> None:
        self._wake.clear()
        soonest = min((d.at for d in self._due.values()), default=None)
        if soonest is None:
            await self._wake.wait()
            return
        with contextlib.suppress(asyncio.TimeoutError):  # due now
            await asyncio.wait_for(self._wake.wait(), max(soonest - time.monotonic(), 0))

    async def _try(self, room_id: str, due: _Due, limit: asyncio.Semaphore) -> None:
        async with limit:
            if self._due.get(room_id) is not due:
                return  # a reconciliation read it meanwhile
            try:
                await self.read(room_id)
            except Exception as e:  # still unreadable (or the database is down): later
                self._failed(room_id, due, e)
                return
        if self._due.get(room_id) is due:
            del self._due[room_id]

    def _failed(self, room_id: str, due: _Due, error: Exception) -> None:
        due.tries += 1
        if due.tries >= self.max_tries:
            if self._due.get(room_id) is due:
                del self._due[room_id]
                self._given_up.add(room_id)
            self.log.warning(
                "%s is still unreadable after %d tries (%s): it keeps its row; the next start"
                " or !lambda reconcile reads it again",
                room_id, due.tries, error,
            )  # fmt: skip
            return
        wait = backoff_s(due.tries + 1, self.first_s, self.max_s)
        due.at = time.monotonic() + wait
        self.log.info("Reading %s again failed (%s); next try in %.0fs", room_id, error, wait)
