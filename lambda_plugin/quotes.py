"""Replies as context: the text of the event a message replies to, for the agent.

A user who replies to an earlier message (theirs, another member's, the bot's answer) means
it: the agent gets that event's text, quoted and bounded by ``access.max_quote_chars``, then
the new text (its reply fallback already trimmed by intake). A file replied to is named by
its caption. What can't be read (gone, redacted, not decryptable) is left out silently.
"""

from __future__ import annotations

import logging
from typing import Any

from .intake import FILE_MSGTYPES, trimmed
from .matrix import HomeserverError, Matrix


async def quoted_text(
    mx: Matrix, room_id: str, event_id: str, max_chars: int, log: logging.Logger
) -> str:
    """The text of the event ``event_id`` (at most ``max_chars``, cut with "…"); "" when
    it can't be read or holds none."""
    try:
        event = await mx.shown_event(room_id, event_id)
    except HomeserverError as e:
        log.debug("The event %s replied to in %s can't be read: %s", event_id, room_id, e)
        return ""
    return _cut(text_of(event), max_chars)


def text_of(event: dict[str, Any]) -> str:
    """A message event's text (as shown: its newest edit, where the homeserver bundles
    it); a file's caption or name."""
    content = event.get("content")
    if event.get("type") != "m.room.message" or not isinstance(content, dict):
        return ""
    body = trimmed(content).get("body")
    if not isinstance(body, str):
        return ""
    if content.get("msgtype") in FILE_MSGTYPES:
        return f"[file: {body}]"
    return body.strip()


def with_quote(text: str, quote: str) -> str:
    """``text`` after the quoted ``quote`` (Markdown quote lines), as the agent reads it."""
    if not quote:
        return text
    lines = "\n".join(f"> {line}" if line else ">" for line in quote.split("\n"))
    return f"{lines}\n\n{text}"


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max(max_chars - 1, 0)] + "…"
