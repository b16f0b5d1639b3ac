"""Catch-up after a start: what users said while the bot was down, or in its first seconds up.

maubot drops every event of the first sync after a start, user messages included, so after
reconciliation the plugin reads the recent timeline of every active chat room itself (one
filtered ``/sync``) and hands each unanswered message or command, oldest first, to the same
handlers live events reach. Handled event ids are stored, so nothing is answered twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from maubot.matrix import MaubotMessageEvent
from mautrix.client import SyncStream
from mautrix.types import EventType, MessageEvent

from .files import FILE_MSGTYPES
from .matrix import HomeserverError, one_off_sync_filter

if TYPE_CHECKING:
    from .bot import LambdaBot

TIMELINE_LIMIT = 50
ANSWERED = ("m.text", "m.emote", *FILE_MSGTYPES)


def catch_up_filter() -> str:
    return one_off_sync_filter({"limit": TIMELINE_LIMIT, "types": ["m.room.message"]})


def parse_invites(sync: dict[str, Any], bot_id: str) -> list[tuple[str, str]]:
    invites = []
    for room_id, data in sync.get("rooms", {}).get("invite", {}).items():
        for event in data.get("invite_state", {}).get("events", []):
            if event.get("type") == "m.room.member" and event.get("state_key") == bot_id:
                invites.append((room_id, event.get("sender", "")))
                break
    return invites


def unanswered(
    timelines: dict[str, list[dict[str, Any]]],
    rooms: set[str],
    bot_id: str,
    since_ms: int,
    handled: set[str],
) -> list[tuple[str, dict[str, Any]]]:
    """(room id, event) of what users said in ``rooms`` after ``since_ms`` that was not
    handled, in each room's order. Where the database knows none of a room's recent events
    (it was lost or reset), only what came after the bot's last word counts: what came
    before was answered, and answering it again would repeat the bot."""
    found = []
    for room_id in sorted(rooms):
        events = timelines.get(room_id, [])
        if not any(e.get("event_id") in handled for e in events):
            last_bot = max(
                (i for i, e in enumerate(events) if e.get("sender") == bot_id), default=-1
            )
            events = events[last_bot + 1 :]
        for event in events:
            if (
                event.get("type") == "m.room.message"
                and event.get("sender") != bot_id
                and int(event.get("origin_server_ts") or 0) >= since_ms
                and event.get("event_id") not in handled
                and isinstance(event.get("content"), dict)
                and event["content"].get("msgtype") in ANSWERED
                and event["content"].get("m.relates_to", {}).get("rel_type") != "m.replace"
            ):
                found.append((room_id, event))
    return found


SYNC_TOKEN_KEY = "catch_up_since"


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
    def __init__(self, bot: LambdaBot) -> None:
        self.bot = bot

    async def queue_missed(
        self, max_age_s: float
    ) -> tuple[list[MaubotMessageEvent], list[tuple[str, str]]]:
        """Puts missed messages at the head of their rooms' queues (before anything that
        arrived during the start); returns the missed commands, for after the start, and the
        pending invites (room, inviter) the same /sync shows."""
        bot = self.bot
        query = {"filter": catch_up_filter(), "timeout": "0"}
        since = await bot.store.get_value(SYNC_TOKEN_KEY)
        if since:
            query["since"] = since  # only what happened since; else every room is walked
        try:
            sync = await bot.mx.sync(query)
        except HomeserverError:
            if not since:
                raise
            del query["since"]  # a position the homeserver no longer knows: read it all
            sync = await bot.mx.sync(query)
        timelines = {
            room_id: room.get("timeline", {}).get("events", [])
            for room_id, room in sync.get("rooms", {}).get("join", {}).items()
        }
        active = {r.room_id for r in bot.registry.rooms.values() if not r.gone and not r.archived}
        candidates = [e["event_id"] for t in timelines.values() for e in t if "event_id" in e]
        handled = await bot.store.handled_among(candidates)
        since_ms = int((time.time() - max_age_s) * 1000)
        # Commands count in every room (a !chats in the DM too); messages in chat rooms.
        missed = unanswered(timelines, set(timelines), bot.mx.user_id, since_ms, handled)
        jobs: dict[str, list] = {}
        commands = []
        for room_id, raw in missed:
            event = self._event(room_id, raw)
            if event is None:
                continue
            job = bot.router.job_for(event)
            if job is not None and room_id in active:
                jobs.setdefault(room_id, []).append(job)
            elif job is None and (event.content.body or "").startswith("!"):
                commands.append(event)
            else:
                continue
            bot.log.info("Catching up %s in %s", event.event_id, room_id)
        for room_id, room_jobs in jobs.items():
            bot.router.worker(room_id).push_front(room_jobs)
        count = sum(len(j) for j in jobs.values()) + len(commands)
        bot.log.info("Caught up %d message(s) sent while the bot was away", count)
        return commands, parse_invites(sync, bot.mx.user_id)

    def _event(self, room_id: str, raw: dict[str, Any]) -> MaubotMessageEvent | None:
        try:
            event = MessageEvent.deserialize({**raw, "room_id": room_id})
        except Exception:  # a malformed event is skipped, never fatal
            self.bot.log.debug("Skipping a malformed event %s in catch-up", raw.get("event_id"))
            return None
        event.content.trim_reply_fallback()  # as maubot does for live events
        event = MaubotMessageEvent(event, self.bot.client)
        event.source = SyncStream.JOINED_ROOM | SyncStream.TIMELINE
        return event

    async def dispatch_commands(self, events: list[MaubotMessageEvent]) -> None:
        """Hands missed commands to the same handlers live ones reach, in order."""
        handlers = [
            func
            for func, event_type in self.bot.message_handlers()
            if event_type == EventType.ROOM_MESSAGE
        ]
        # Started in order and not awaited one by one: handlers that keep a room's order
        # take their place before their first await.
        tasks = [asyncio.create_task(handler(e)) for e in events for handler in handlers]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
