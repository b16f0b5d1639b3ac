"""Catch-up after a start: what users said while the bot was down, or in its first seconds up.

maubot drops every event of the first sync after a start, user messages included, so after
reconciliation the plugin reads the recent timeline of every room itself (one filtered
``/sync``) and hands each unanswered message or command, oldest first, to the same paths live
events take: ``intake.classify`` decides what each is, the room's queue keeps the order.
The data of maubot's first sync (which it drops) is handed over the same way. Handled event
ids are stored, so nothing is answered twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from maubot.matrix import MaubotMatrixClient, MaubotMessageEvent
from mautrix.client import SyncStream
from mautrix.types import JSON, EventType, MessageEvent

from .intake import Incoming, Kind, answered_ids, classify
from .matrix import HomeserverError, Matrix, one_off_sync_filter
from .queue import QueueItem, RoomQueues

TIMELINE_LIMIT = 50
SYNC_TOKEN_KEY = "catch_up_since"
# The same position in the bot's account data: the rooms are the truth, and where the
# catch-up resumes from survives a lost database too (no full /sync over every room).
SYNC_POSITION_TYPE = "ai.lambda.matrix.catch_up"

Handlers = Callable[[], list[tuple[Callable, EventType]]]


def catch_up_filter() -> str:
    types = ["m.room.message", "m.room.encrypted"]  # encrypted ones are decrypted after
    return one_off_sync_filter({"limit": TIMELINE_LIMIT, "types": types})


def parse_invites(sync: dict[str, Any], bot_id: str) -> list[tuple[str, str]]:
    """(room, inviter) of every pending invite of the bot in a /sync answer."""
    invites = []
    rooms = sync.get("rooms") if isinstance(sync, dict) else None
    invited = rooms.get("invite") if isinstance(rooms, dict) else None
    for room_id, data in (invited if isinstance(invited, dict) else {}).items():
        state = data.get("invite_state") if isinstance(data, dict) else None
        events = state.get("events") if isinstance(state, dict) else None
        for event in events if isinstance(events, list) else []:
            if (
                isinstance(event, dict)
                and event.get("type") == "m.room.member"
                and event.get("state_key") == bot_id
                and isinstance(event.get("sender"), str)
            ):
                invites.append((room_id, event["sender"]))
                break
    return invites


def timelines_of(sync: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each joined room's timeline events in a /sync answer (malformed parts left out)."""
    rooms = sync.get("rooms") if isinstance(sync, dict) else None
    joined = rooms.get("join") if isinstance(rooms, dict) else None
    found = {}
    for room_id, room in (joined if isinstance(joined, dict) else {}).items():
        timeline = room.get("timeline") if isinstance(room, dict) else None
        events = timeline.get("events") if isinstance(timeline, dict) else None
        if isinstance(room_id, str) and isinstance(events, list):
            found[room_id] = [e for e in events if isinstance(e, dict)]
    return found


def unanswered(
    timelines: dict[str, list[dict[str, Any]]],
    rooms: set[str],
    bot_id: str,
    since_ms: int,
    handled: set[str],
) -> list[tuple[str, dict[str, Any]]]:
    """(room id, event) of what users said in ``rooms`` after ``since_ms`` that nobody
    answered, in each room's order. Answered is what the database recorded as handled, or
    what a notice of the bot in the room names (``intake.ANSWERS``): that fact survives a
    lost database. Where the database knows none of a room's recent events and no notice
    names one (answers of older versions), only what came after the bot's last word counts."""
    found = []
    for room_id in sorted(rooms):
        events = [e for e in timelines.get(room_id, []) if isinstance(e, dict)]
        answered = handled | answered_ids(events, bot_id)
        if not any(isinstance(e.get("event_id"), str) and e["event_id"] in answered for e in events):
            last_bot = max(
                (i for i, e in enumerate(events) if e.get("sender") == bot_id), default=-1
            )
            events = events[last_bot + 1 :]
        for event in events:
            incoming = classify({**event, "room_id": room_id}, bot_id)
            if (
                incoming.kind is not Kind.IGNORED
                and incoming.timestamp >= since_ms
                and incoming.event_id not in answered
            ):
                found.append((room_id, event))
    return found


class SyncPositions:
    """Where maubot's sync stood, over time. Catch-up after a restart reads from a position
    at least the catch-up window old: an incremental /sync from there is cheap (only rooms
    with news), where a full one walks every room the bot is in."""

    def __init__(self) -> None:
        self.seen: deque[tuple[float, str]] = deque()

    def record(self, token: str) -> None:
        self.seen.append((time.time(), token))

    def older_than(self, age_s: float) -> str | None:
        """The newest position seen at least ``age_s`` ago (older ones are dropped)."""
        cutoff = time.time() - age_s
        found = None
        while self.seen and self.seen[0][0] <= cutoff:
            found = self.seen.popleft()[1]
        if found is not None:
            self.seen.appendleft((cutoff, found))  # still the answer until a newer one ages
        return found


class CatchUp:
    """Reads what was missed and queues it, messages and commands as one sequence per room.

    A missed command gets a reserved place in its room's queue, at its place in the
    timeline; the command handler that maubot's dispatch runs later takes that place."""

    def __init__(
        self,
        mx: Matrix,
        queues: RoomQueues,
        client: MaubotMatrixClient,
        handlers: Handlers,
        enqueue: Callable[[Incoming], object],
        log: logging.Logger,
    ) -> None:
        self.mx = mx
        self.queues = queues
        self.client = client
        self.handlers = handlers  # the handlers maubot dispatches events to, as registered
        self.enqueue = enqueue  # a live event's way into its room's queue (Router.enqueue)
        self.log = log

    async def read(self, since: str | None) -> dict[str, Any]:
        """One /sync from ``since`` (the whole recent timeline when None or unknown)."""
        query = {"filter": catch_up_filter(), "timeout": "0"}
        if since:
            query["since"] = since  # only what happened since; else every room is walked
        try:
            return await self.mx.sync(query)
        except HomeserverError:
            if not since:
                raise
            del query["since"]  # a position the homeserver no longer knows: read it all
            return await self.mx.sync(query)

    def queue(
        self, missed: list[tuple[str, dict[str, Any]]], active: set[str]
    ) -> list[tuple[Incoming, dict[str, Any]]]:
        """Puts missed messages and places for missed commands at the head of their rooms'
        queues, in timeline order; returns the commands, for maubot's handlers."""
        heads: dict[str, list[QueueItem]] = {}
        commands: list[tuple[Incoming, dict[str, Any]]] = []
        for room_id, raw in missed:
            incoming = classify({**raw, "room_id": room_id}, self.mx.user_id)
            if incoming.kind is Kind.MESSAGE and room_id in active:
                heads.setdefault(room_id, []).append(incoming)
            elif incoming.kind is Kind.COMMAND:
                heads.setdefault(room_id, []).append(self.queues.reserve(incoming.event_id))
                commands.append((incoming, raw))
            else:
                continue
            self.log.info("Catching up %s in %s", incoming.event_id, room_id)
        for room_id, items in heads.items():
            self.queues.worker(room_id).push_front(items)
        count = sum(len(items) for items in heads.values())
        self.log.info("Caught up %d message(s) sent while the bot was away", count)
        return commands

    def enqueue_all(self, timelines: dict[str, list[dict]], since_ms: int) -> list:
        """Queues the messages of ``timelines`` the live way (events older than ``since_ms``
        and what is not a message or command left out); returns the commands."""
        commands = []
        for room_id, events in timelines.items():
            for raw in events:
                incoming = classify({**raw, "room_id": room_id}, self.mx.user_id)
                if incoming.kind is Kind.IGNORED or incoming.timestamp < since_ms:
                    continue
                if incoming.kind is Kind.COMMAND:
                    commands.append((incoming, raw))
                else:
                    self.enqueue(incoming)
        return commands

    async def hand_over(self, room_id: str, raw: dict[str, Any]) -> None:
        """One event that reached no handler (decrypted late) goes the live way now."""
        await self.dispatch(self.enqueue_all({room_id: [raw]}, 0))

    async def dispatch(self, commands: list[tuple[Incoming, dict[str, Any]]]) -> None:
        """Hands missed commands to the same handlers live ones reach; a place reserved for a
        command its handler did not take (it needs no turn, or was refused) is let go."""
        try:
            handlers = [
                f for f, event_type in self.handlers() if event_type == EventType.ROOM_MESSAGE
            ]
            events = [e for e in (self._event(i, raw) for i, raw in commands) if e is not None]
            # Started in order and not awaited one by one: handlers that keep a room's order
            # take their place before their first await.
            tasks = [asyncio.create_task(handler(e)) for e in events for handler in handlers]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.queues.release_reserved([incoming.event_id for incoming, _ in commands])

    def _event(self, incoming: Incoming, raw: dict[str, Any]) -> MaubotMessageEvent | None:
        try:
            event = MessageEvent.deserialize(cast(JSON, {**raw, "room_id": incoming.room_id}))
            event.content.trim_reply_fallback()  # as maubot does for live events
        except Exception:  # a malformed event is skipped, never fatal
            self.log.debug("Skipping a malformed event %s in catch-up", incoming.event_id)
            return None
        wrapped = MaubotMessageEvent(event, self.client)
        wrapped.source = SyncStream.JOINED_ROOM | SyncStream.TIMELINE
        return wrapped
