"""Re-answers: an edit of the owner's latest message, or their 🔁 on the latest answer,
answers that message again in its turn, the bot's answer edited in place.

Decided in the room's turn, from what the room holds: the original (an edit may name any
event: it must be a message of the edit's own sender, not a command nor a file), the answer
reacted to (the bot's, naming the message it answers), and the ledger, which knows each
conversation turn's events and the answer's first event. A message is the latest when no
other turn's message came between it and the re-answer. Anyone but the owner changes
nothing; an older message gets one short notice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any

from .db import ChatRoomRow
from .intake import ANSWERING, ANSWERS, Incoming, Kind, classify
from .ledger import Fate, Ledger, incoming_of
from .matrix import HomeserverError, Matrix
from .notices import Notices
from .part import Part

Outcome = Incoming | tuple[Fate, str]  # what to answer, or the event's fate without one


@dataclass(frozen=True)
class _Turn:
    """The message a re-answer is for, in its newest form, and when the turn began."""

    form: Incoming
    since_ms: int
    answer_event: str


@dataclass(eq=False, kw_only=True)
class Reanswers(Part):
    mx: Matrix
    ledger: Ledger
    notices: Notices

    async def resolve(self, room: ChatRoomRow, incoming: Incoming) -> Outcome:
        """What an edit or a 🔁 answers: the message's text with the answer to edit in place
        (``resume``), or its fate when there is nothing to answer. Kept (for ``!retry``)
        when the room can't be read now."""
        if incoming.sender != room.user_id:
            return Fate.LEFT, "not the owner's"
        turn: _Turn | tuple[Fate, str] | None
        try:
            if incoming.kind is Kind.REGENERATE:
                turn = await self._regenerated(room.room_id, incoming)
            else:
                turn = await self._edited(room.room_id, incoming)
        except HomeserverError as e:  # an outage: the original may be superseded already
            self.log.warning("Reading what %s answers again failed: %s", incoming.event_id, e)
            with contextlib.suppress(HomeserverError):
                await self.notices.note(room.room_id, "send.failed", reply_to=incoming.event_id)
            return Fate.KEPT, "read"
        if isinstance(turn, tuple):
            return turn
        if turn is None or turn.form.sender != incoming.sender:
            return Fate.LEFT, "not a message to answer again"
        if await self.ledger.newer_message(
            room.room_id, turn.form.turn, turn.since_ms, incoming.timestamp
        ):
            await self.notices.say(room.room_id, "reanswer.older", reply_to=incoming.event_id)
            return Fate.REFUSED, "older"
        found = replace(
            incoming, body=turn.form.body, file=turn.form.file, reply_to=turn.form.reply_to,
            replaces=turn.form.turn, resume=turn.answer_event,
        )  # fmt: skip
        await self.ledger.supersede_turn(found)
        return found

    async def _edited(self, room_id: str, edit: Incoming) -> _Turn | tuple[Fate, str] | None:
        rows = await self.ledger.turn(room_id, edit.replaces)
        if await self._newer_form(room_id, edit.replaces, edit, rows):
            return Fate.SUPERSEDED, "edited again"  # the newer edit answers, in its turn
        # As the ledger holds it (read from the room once, by this plugin), else the room's.
        held = next((row for row in rows if row.event_id == edit.replaces), None)
        original = incoming_of(held, self.mx.user_id) if held is not None else None
        if original is None:
            original = await self._message(room_id, edit.replaces)
        if (
            original is None or original.kind is not Kind.MESSAGE or original.replaces
            or original.file is not None
        ):  # fmt: skip
            return None  # an edit of an edit is none (edits name the original), nor of a file
        original = replace(original, body=edit.body, resume="")
        return _Turn(original, original.timestamp, _answer_event(rows))

    async def _regenerated(
        self, room_id: str, reaction: Incoming
    ) -> _Turn | tuple[Fate, str] | None:
        answered = await self._answered_by(room_id, reaction.regenerates)
        if answered is None:
            return None
        rows = await self.ledger.turn(room_id, answered)
        named = next((row for row in rows if row.event_id == answered), None)
        turn = named.replaces if named is not None and named.replaces else answered
        if turn != answered:
            rows = await self.ledger.turn(room_id, turn)
        if await self._newer_form(room_id, turn, reaction, rows):
            return Fate.SUPERSEDED, "edited since"  # a kept 🔁 retried after an edit, say
        forms = (  # the owner's own, up to the 🔁 (a newer edit is answered in its turn)
            incoming_of(row, self.mx.user_id) for row in rows
            if row.kind == "message" and row.sender == reaction.sender
            and row.ts <= reaction.timestamp
        )  # fmt: skip
        form = next((found for found in forms if found is not None), None)
        if form is None:  # the ledger forgot it (pruned, a lost database): as the room has it
            form = await self._message(room_id, turn)
        if form is None or form.kind is not Kind.MESSAGE:
            return None
        first = next((row.ts for row in rows if row.event_id == turn), form.timestamp)
        form = replace(form, event_id=turn, replaces="")
        return _Turn(form, first, _answer_event(rows) or reaction.regenerates)

    async def _newer_form(self, room_id: str, turn: str, by: Incoming, rows: list[Any]) -> bool:
        """Whether a newer edit of the turn, by the same sender, will be answered: it came
        after ``by`` (an edit, a 🔁) with no other turn's message between (else it is
        refused as older, and ``by`` must answer)."""
        for row in rows:
            if _later_edit(row, by) and not await self.ledger.newer_message(
                room_id, turn, by.timestamp, row.ts
            ):
                return True
        return False

    async def _message(self, room_id: str, event_id: str) -> Incoming | None:
        """The room's event ``event_id`` as intake sees it (None: unreadable, or no message)."""
        event = await self._event(room_id, event_id)
        found = classify({**event, "room_id": room_id}, self.mx.user_id) if event else None
        return found if found is not None and found.kind is Kind.MESSAGE else None

    async def _answered_by(self, room_id: str, event_id: str) -> str | None:
        """The message the bot's event ``event_id`` answers (or is the unfinished answer of)."""
        event = await self._event(room_id, event_id)
        content = event.get("content") if event else None
        if event is None or event.get("sender") != self.mx.user_id or not isinstance(content, dict):
            return None
        named = content.get(ANSWERS, content.get(ANSWERING))
        return named if isinstance(named, str) else None

    async def _event(self, room_id: str, event_id: str) -> dict[str, Any] | None:
        """The event, opened; None when the room has none such for the bot (gone, never
        there, not visible); an outage is raised."""
        try:
            return await self.mx.opened_event(room_id, event_id)
        except HomeserverError as e:
            if e.status not in (400, 403, 404):
                raise
            self.log.debug("Could not read %s in %s: %s", event_id, room_id, e)
            return None


def _later_edit(row: Any, by: Incoming) -> bool:
    """A newer edit of the turn by the same sender that is answered or still may be."""
    return (
        bool(row.replaces) and row.sender == by.sender and row.event_id != by.event_id
        and row.kind == "message" and row.ts > by.timestamp
        and row.state not in (Fate.LEFT.value, Fate.REFUSED.value)
    )  # fmt: skip


def _answer_event(rows: list[Any]) -> str:
    """The first event of the turn's newest answer (what a re-answer edits), if known."""
    return next((row.answer_event for row in rows if row.answer_event), "")
