"""Catch-up after a start: what users said while the bot was down, or in its first seconds up.

maubot drops every event of the first sync after a start, user messages included, so after
reconciliation the plugin reads the recent timeline of every active chat room itself (one
filtered ``/sync``) and hands each unanswered message or command, oldest first, to the same
handlers live events reach. Handled event ids are stored, so nothing is answered twice.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from maubot.matrix import MaubotMessageEvent
from mautrix.client import SyncStream
from mautrix.types import EventType, MessageEvent

from .files import FILE_MSGTYPES
from .matrix import one_off_sync_filter

if TYPE_CHECKING:
    from .bot import LambdaBot

TIMELINE_LIMIT = 50
ANSWERED = ("m.text", "m.emote", *FILE_MSGTYPES)


def catch_up_filter() -> str:
    return one_off_sync_filter({"limit": TIMELINE_LIMIT, "types": ["m.room.message"]})


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
            ):
                found.append((room_id, event))
    return found


class CatchUp:
    def __init__(self, bot: LambdaBot) -> None:
        self.bot = bot

    async def run(self, max_age_s: float) -> int:
        """Dispatches what was missed; returns how many events."""
        bot = self.bot
        sync = await bot.mx.sync({"filter": catch_up_filter(), "timeout": "0"})
        timelines = {
            room_id: room.get("timeline", {}).get("events", [])
            for room_id, room in sync.get("rooms", {}).get("join", {}).items()
        }
        active = {r.room_id for r in bot.registry.rooms.values() if not r.gone and not r.archived}
        candidates = [
            e["event_id"] for r in active for e in timelines.get(r, []) if "event_id" in e
        ]
        handled = await bot.store.handled_among(candidates)
        since_ms = int((time.time() - max_age_s) * 1000)
        missed = unanswered(timelines, active, bot.mx.user_id, since_ms, handled)
        handlers = [
            func
            for func, event_type in bot.message_handlers()
            if event_type == EventType.ROOM_MESSAGE
        ]
        tasks = []
        for room_id, raw in missed:
            raw = {**raw, "room_id": room_id}
            try:
                event = MessageEvent.deserialize(raw)
            except Exception:
                bot.log.debug("Skipping a malformed event %s in catch-up", raw.get("event_id"))
                continue
            event = MaubotMessageEvent(event, bot.client)
            event.source = SyncStream.JOINED_ROOM | SyncStream.TIMELINE
            bot.log.info("Catching up %s in %s", event.event_id, room_id)
            # Started in order and not awaited one by one: the handlers keep each room's
            # order themselves (they queue before their first await).
            tasks.extend(asyncio.create_task(handler(event)) for handler in handlers)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return len(missed)
