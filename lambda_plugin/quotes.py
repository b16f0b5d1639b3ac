"""Replies as context: the text of the event a message replies to, for the agent.

A user who replies to an earlier message (theirs, another member's, the bot's answer) means
it: the agent gets that event's text, quoted and bounded by ``access.max_quote_chars``, then
the new text (its reply fallback already trimmed by intake). A file replied to is named by
its caption; when it went to the workspace, where it landed too, as the path relative to the
workspace root the agent was given with it (``[file: name, in the workspace at <path>]``).
That place is looked up by the reply's room and the event id together, so an id named from
another room never finds this room's file; without a record (no workspace, or pruned with
the ledger) the file is named only. What can't be read (gone, redacted, not decryptable) is
left out silently.
"""

from __future__ import annotations

import logging
from typing import Any

from .db.places import FilePlaceTable
from .intake import FILE_MSGTYPES, trimmed
from .matrix import HomeserverError, Matrix

_FILE = "[file: "


async def quoted_text(
    mx: Matrix,
    room_id: str,
    event_id: str,
    max_chars: int,
    log: logging.Logger,
    places: FilePlaceTable | None = None,
) -> str:
    """The text of the event ``event_id`` (at most ``max_chars``, cut with "…"); "" when
    it can't be read or holds none. A file's workspace path (``places``) is never cut."""
    try:
        event = await shown_event(mx, room_id, event_id)
    except HomeserverError as e:
        log.debug("The event %s replied to in %s can't be read: %s", event_id, room_id, e)
        return ""
    found = _body(event)
    if found is not None and found[1]:  # a file: where it landed, when that is known
        path = await _place(places, room_id, event_id, log)
        if path:
            return file_quote(found[0], path, max_chars)
    return _cut(text_of(event), max_chars)


async def shown_event(mx: Matrix, room_id: str, event_id: str) -> dict[str, Any]:
    """The event as a client shows it: opened, with the newest edit by its own sender that
    the homeserver bundles with it (``unsigned.m.relations.m.replace``; /event itself serves
    the original, MSC2676): a streamed answer's final text, not its first partial."""
    found = await mx.event(room_id, event_id)
    unsigned = found.get("unsigned")
    relations = unsigned.get("m.relations") if isinstance(unsigned, dict) else None
    edit = relations.get("m.replace") if isinstance(relations, dict) else None
    if found.get("type") == "m.room.encrypted":
        found = await mx.crypto.open(room_id, found) or {}
    if isinstance(edit, dict) and edit.get("type") == "m.room.encrypted":
        edit = await mx.crypto.open(room_id, edit)
    content = edit.get("content") if isinstance(edit, dict) else None
    newest = content.get("m.new_content") if isinstance(content, dict) else None
    if isinstance(newest, dict) and found and edit and edit.get("sender") == found.get("sender"):
        found = {**found, "content": newest}
    return found


def text_of(event: dict[str, Any]) -> str:
    """A message event's text (as shown: its newest edit, where the homeserver bundles
    it); a file's caption or name."""
    found = _body(event)
    if found is None:
        return ""
    body, is_file = found
    return f"{_FILE}{body}]" if is_file else body.strip()


def file_quote(name: str, path: str, max_chars: int) -> str:
    """A file named with its place in the workspace; the name is cut to fit ``max_chars``,
    the path never (cut short, it would name another file, or none)."""
    tail = f", in the workspace at {path}]"
    return f"{_FILE}{_cut(name, max(max_chars - len(_FILE) - len(tail), 1))}{tail}"


def with_quote(text: str, quote: str) -> str:
    """``text`` after the quoted ``quote`` (Markdown quote lines), as the agent reads it."""
    if not quote:
        return text
    lines = "\n".join(f"> {line}" if line else ">" for line in quote.split("\n"))
    return f"{lines}\n\n{text}"


def _body(event: dict[str, Any]) -> tuple[str, bool] | None:
    """A message event's body (its reply fallback trimmed) and whether it is a file's."""
    content = event.get("content")
    if event.get("type") != "m.room.message" or not isinstance(content, dict):
        return None
    body = trimmed(content).get("body")
    if not isinstance(body, str):
        return None
    return body, content.get("msgtype") in FILE_MSGTYPES


async def _place(
    places: FilePlaceTable | None, room_id: str, event_id: str, log: logging.Logger
) -> str:
    """Where the file message landed in the workspace ("": not recorded, or not readable:
    the quote names the file only, the answer goes on)."""
    if places is None:
        return ""
    try:
        row = await places.get(room_id, event_id)
    except Exception as e:
        log.warning("Looking up where the file of %s in %s landed failed: %s", event_id, room_id, e)
        return ""
    return row.path if row is not None else ""


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max(max_chars - 1, 0)] + "…"
