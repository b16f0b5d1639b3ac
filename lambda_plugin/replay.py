"""Commands that reached no handler of maubot's (missed while the plugin was down, or in
maubot's first sync, which it drops) are run in their room's turn by the same handlers live
ones reach. While a replayed command runs, ``@in_turn`` knows it already has its turn."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import cast

from maubot.matrix import MaubotMatrixClient, MaubotMessageEvent
from mautrix.client import SyncStream
from mautrix.types import JSON, EventType, MessageEvent

from .intake import Incoming

Handlers = Callable[[], list[tuple[Callable, EventType]]]
# The event id of the command being replayed in its room's turn, in that task and its own.
_IN_TURN: contextvars.ContextVar[str] = contextvars.ContextVar("lambda_in_turn", default="")


def replaying(event_id: str) -> bool:
    """Whether the command ``event_id`` is being run in its turn already (replayed)."""
    return bool(event_id) and _IN_TURN.get() == event_id


class CommandReplay:
    """Runs one missed command through maubot's handlers, awaiting them, in its turn."""

    def __init__(self, client: MaubotMatrixClient, handlers: Handlers, log: logging.Logger) -> None:
        self.client = client
        self.handlers = handlers  # the handlers maubot dispatches events to, as registered
        self.log = log

    async def __call__(self, incoming: Incoming) -> None:
        event = self._event(incoming)
        if event is None:
            return
        handlers = [f for f, kind in self.handlers() if kind == EventType.ROOM_MESSAGE]
        token = _IN_TURN.set(incoming.event_id)
        try:  # tasks copy the context: each handler sees the command as in its turn
            results = await asyncio.gather(*(h(event) for h in handlers), return_exceptions=True)
        finally:
            _IN_TURN.reset(token)
        for result in results:
            if isinstance(result, Exception):
                self.log.error("Replaying %s failed", incoming.event_id, exc_info=result)

    def _event(self, incoming: Incoming) -> MaubotMessageEvent | None:
        raw = incoming.source or {}
        try:
            event = MessageEvent.deserialize(cast(JSON, {**raw, "room_id": incoming.room_id}))
            event.content.trim_reply_fallback()  # as maubot does for live events
        except Exception:  # a malformed event is skipped, never fatal
            self.log.debug("Skipping a malformed command %s", incoming.event_id)
            return None
        wrapped = MaubotMessageEvent(event, self.client)
        wrapped.source = SyncStream.JOINED_ROOM | SyncStream.TIMELINE
        return wrapped
