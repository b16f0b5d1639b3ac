"""The ledger: every user message and command the plugin sees has one durable fate.

A row per event id, written only here: ``seen`` (queued) -> ``taken`` (the agent was asked)
-> one end: ``answered`` (its finished answer is in the room), ``refused`` (a notice said why;
nothing to retry), ``left`` (not the bot's to answer), ``kept`` (held for ``!retry``, with the
reason), ``superseded`` (edited). A start trusts only ends: what is ``seen`` or ``taken``
when the plugin died is run again, once. Which event a running handler holds is the only
thing kept in memory (a claim), so one delivery runs at a time.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from .db import LedgerRow, Store, now_ms
from .db.ledger import LedgerTable
from .db.store import waiting_out
from .intake import Incoming, Kind, classify
from .part import Part

T = TypeVar("T")


class Fate(enum.Enum):
    SEEN = "seen"
    TAKEN = "taken"
    ANSWERED = "answered"
    REFUSED = "refused"
    LEFT = "left"
    KEPT = "kept"
    SUPERSEDED = "superseded"


UNFINISHED = (Fate.SEEN.value, Fate.TAKEN.value)
# Ends after which an event is never run again (kept waits for !retry).
DONE = frozenset({Fate.ANSWERED.value, Fate.REFUSED.value, Fate.LEFT.value, Fate.SUPERSEDED.value})


def row_of(incoming: Incoming, fate: Fate = Fate.SEEN) -> LedgerRow:
    event = json.dumps(incoming.source, ensure_ascii=False) if incoming.source else None
    return LedgerRow(
        event_id=incoming.event_id, room_id=incoming.room_id, sender=incoming.sender,
        kind=incoming.kind.value, state=fate.value, reason="", ts=incoming.timestamp,
        event=event, answer_event=None, updated_at=now_ms(), replaces=incoming.replaces or None,
    )  # fmt: skip


def incoming_of(row: LedgerRow, bot_id: str) -> Incoming | None:
    """The event a row holds, classified again (None: it holds none, or none readable)."""
    try:
        event = json.loads(row.event) if row.event else None
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    found = classify({**event, "room_id": row.room_id}, bot_id)
    if found.kind is Kind.IGNORED or found.event_id != row.event_id:
        return None
    return found.resuming(row.answer_event or "")


@dataclass(eq=False, kw_only=True)
class Ledger(Part):
    """The one writer of the ledger."""

    store: Store
    bot_id: Callable[[], str]
    background: Callable[[Coroutine[Any, Any, Any]], object] = field(default=asyncio.ensure_future)

    def __post_init__(self) -> None:
        self.table = LedgerTable(self.store.db)
        self._claimed: set[str] = set()  # events a handler of this process holds
        self._queued: set[str] = set()  # seen (queued) in this process and not ended yet
        # Answers in the room whose end is being written: done, whatever cancels meanwhile.
        self._delivered: dict[str, asyncio.Future] = {}

    async def _db(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        return await waiting_out(call, self.settings().database_wait_s, f"ledger {what}")

    def seen(self, incoming: Incoming) -> None:
        """Writes, in the background, that a message was queued: a crash before its turn
        still leaves it to the next start, however old it is by then."""
        self._queued.add(incoming.event_id)
        self.background(self._seen(incoming))

    def left(self, incoming: Incoming, reason: str) -> None:
        """Writes, in the background, that an event is not the bot's to answer (it took no
        place in the room's queue)."""
        row = replace(row_of(incoming, Fate.LEFT), reason=reason, event=None)
        self.background(self._write(row, "left"))

    async def _write(self, row: LedgerRow, what: str) -> None:
        try:
            await self._db(lambda: self.table.add(row), what)
        except Exception as e:
            self.log.warning("Recording %s as %s failed: %s", row.event_id, what, e)

    async def _seen(self, incoming: Incoming) -> None:
        await self._write(row_of(incoming), "seen")  # on failure its claim writes it too

    async def claim(self, incoming: Incoming, retried: bool = False) -> bool:
        """True when the event is the caller's to handle now: new, left unfinished by a
        process that died, or kept and sent again by ``!retry``. False when it is done,
        held by another handler (a second delivery), or kept and not retried."""
        event_id = incoming.event_id
        if event_id in self._claimed or event_id in self._delivered:
            return False
        self._claimed.add(event_id)  # before any await: a second delivery sees it at once
        try:
            row = await self._db(lambda: self.table.insert(row_of(incoming)), "claim")
        except BaseException:
            self._claimed.discard(event_id)
            self._queued.discard(event_id)
            raise
        if row.state in UNFINISHED or (retried and row.state == Fate.KEPT.value):
            return True
        self._claimed.discard(event_id)
        self._queued.discard(event_id)
        return False

    def release(self, event_id: str) -> None:
        """Lets go of a claim without an end (a stop mid-answer: the next start runs it)."""
        self._claimed.discard(event_id)

    async def taken(self, event_id: str) -> None:
        await self._set(event_id, Fate.TAKEN, "", keep_event=True)

    async def answer_started(self, event_id: str, answer_event: str) -> None:
        """The bot's first event of the answer (a stream's): a re-answer edits it."""
        await self._db(lambda: self.table.set_answer_event(event_id, answer_event), "answer")

    def delivered(self, event_id: str, answer_event: str = "") -> None:
        """The finished answer is in the room: from now on the message is done, whatever
        happens to its handler (a !cancel, a stop); its end is written in the background,
        with the answer's first event (what an edit or a 🔁 of the message edits)."""
        if event_id not in self._delivered:
            answered = self._answered(event_id, answer_event)
            self._delivered[event_id] = asyncio.ensure_future(answered)

    def was_delivered(self, event_id: str) -> bool:
        return event_id in self._delivered

    async def _answered(self, event_id: str, answer_event: str) -> None:
        try:  # the event stays: a 🔁 answers it again
            await self._set(event_id, Fate.ANSWERED, "", keep_event=True, answer_event=answer_event)
        except Exception as e:  # the next start finds the answer in the room
            self.log.warning("Recording %s as answered failed: %s", event_id, e)
        finally:
            self._delivered.pop(event_id, None)
            self._claimed.discard(event_id)
            self._queued.discard(event_id)

    async def end(self, event_id: str, fate: Fate, reason: str = "") -> bool:
        """Writes the event's end (an end already written stays); False when it had one."""
        writing = self._delivered.get(event_id)
        if writing is not None:
            await asyncio.shield(writing)
            return fate is Fate.ANSWERED
        try:
            return await self._set(event_id, fate, reason, keep_event=fate is Fate.KEPT)
        finally:
            self._claimed.discard(event_id)
            self._queued.discard(event_id)

    async def keep(self, incoming: Incoming, reason: str) -> list[Incoming] | None:
        """Holds the message for ``!retry``; returns the oldest kept ones dropped to stay
        within ``access.max_kept_per_room`` (each ended as refused), or None when the
        message was not kept (it had reached an end: answered meanwhile, say)."""
        if not await self.end(incoming.event_id, Fate.KEPT, reason):
            return None
        kept = await self.kept(incoming.room_id)
        over = kept[: max(0, len(kept) - self.settings().max_kept_per_room)]
        for dropped in over:
            await self._set(dropped.event_id, Fate.REFUSED, "dropped", keep_event=False)
        return over

    async def _set(
        self, event_id: str, fate: Fate, reason: str, keep_event: bool, answer_event: str = ""
    ) -> bool:
        table = self.table
        return await self._db(
            lambda: table.set_state(event_id, fate.value, reason, keep_event, answer_event),
            fate.value,
        )

    async def kept(self, room_id: str) -> list[Incoming]:
        """The room's kept messages, oldest first."""
        rows = await self._db(lambda: self.table.in_states((Fate.KEPT.value,), room_id), "kept")
        return [found for row in rows if (found := incoming_of(row, self.bot_id())) is not None]

    async def unfinished(self) -> list[LedgerRow]:
        """Every event seen or taken and not ended by a process that died (what this one
        has queued itself is in its queues already, in its place)."""
        rows = await self._db(lambda: self.table.in_states(UNFINISHED), "unfinished")
        return [row for row in rows if row.event_id not in self._queued]

    def superseded(self, incoming: Incoming) -> None:
        """Writes, in the background, that an edit of the message replaced it before it was
        answered (queued, or stopped mid-answer)."""
        self._claimed.discard(incoming.event_id)
        self._queued.discard(incoming.event_id)
        # The event stays: the edit's turn reads the original from here, not the room.
        row = replace(row_of(incoming, Fate.SUPERSEDED), reason="edited")

        async def write() -> None:
            await self._write(row, "superseded")  # a row not written yet
            try:
                await self._set(incoming.event_id, Fate.SUPERSEDED, "edited", keep_event=True)
            except Exception as e:  # the next start finds the edit after it: superseded again
                self.log.warning("Recording %s as superseded failed: %s", incoming.event_id, e)

        self.background(write())

    async def supersede_turn(self, incoming: Incoming) -> None:
        """What of the turn ``incoming`` re-answers has no end yet (a kept one) never runs."""
        table = self.table
        await self._db(
            lambda: table.supersede_turn(
                incoming.room_id, incoming.turn, incoming.event_id, incoming.timestamp
            ),
            "supersede",
        )

    async def turn(self, room_id: str, turn: str) -> list[LedgerRow]:
        """The rows of a conversation turn (message, edits, 🔁s), newest first."""
        return await self._db(lambda: self.table.of_turn(room_id, turn), "turn")

    async def newer_message(self, room_id: str, turn: str, after_ms: int, before_ms: int) -> bool:
        table = self.table
        return await self._db(
            lambda: table.newer_message(room_id, turn, after_ms, before_ms), "latest"
        )

    async def states_of(self, event_ids: list[str]) -> dict[str, str]:
        return await self._db(lambda: self.table.states_of(event_ids), "states")

    async def prune(self, older_than_ms: int) -> None:
        """Forgets events not touched since the cut-off (they can't come back by then)."""
        await self._db(lambda: self.table.prune(older_than_ms), "prune")
