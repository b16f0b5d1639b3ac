"""Intake: what an incoming room event is to the plugin, decided in one place.

``classify`` is a pure function of the event as JSON, used by live delivery and by the
catch-up after a start alike, so both treat every event the same. Every field is
type-checked: a malformed event is ignored, never an exception.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from typing import Any

from mautrix.types import MessageEvent, ReactionEvent

FILE_MSGTYPES = ("m.file", "m.image", "m.audio", "m.video")
TEXT_MSGTYPES = ("m.text", "m.emote")
ANSWERED_MSGTYPES = (*TEXT_MSGTYPES, *FILE_MSGTYPES)
COMMAND_PREFIX = "!"
MESSAGE_TYPE = "m.room.message"
REACTION_TYPE = "m.reaction"
REGENERATE = "🔁"  # a reaction on the latest answer: answer its message again
STOP = "🛑"  # a reaction on a running answer: stop it (live only: see reactions.py)
VARIATION = "\ufe0f"  # emoji presentation selector: the same key with or without it
# The field of the bot's notices that names the user's event they answer: whether a message
# was answered is a fact in the room, not only in the plugin's database.
ANSWERS = "ai.lambda.matrix.answers"
# The field of what the bot sends while it works on a message (a streamed answer's first
# event, a voice message's transcript): linked to the message, but not its answer yet.
ANSWERING = "ai.lambda.matrix.answering"
# The field of a notice about a message that is not its answer: why it was kept for !retry
# (an agent or send failure, the rate limit, a quota, !cancel), a voice message's transcript.
# A start does not take it for the answer.
ABOUT = "ai.lambda.matrix.about"
# Set on a live event whose reply fallback mautrix already trimmed: trimming again could eat
# a quote the user wrote at the start of their reply.
TRIMMED = "ai.lambda.matrix.fallback_trimmed"
_HTML_FALLBACK = re.compile(r"^<mx-reply>[\s\S]*?</mx-reply>")


class Kind(enum.Enum):
    MESSAGE = "message"  # a message for the room's agent
    COMMAND = "command"  # a `!`-command
    REGENERATE = "regenerate"  # a 🔁 on an answer: its message answered again
    IGNORED = "ignored"  # anything else: the bot's own, notices, edits of commands, other types


@dataclass(frozen=True)
class Incoming:
    kind: Kind
    event_id: str = ""
    room_id: str = ""
    sender: str = ""
    body: str = ""
    timestamp: int = 0
    command: str = ""  # the command's name, lower case, without the `!`
    file: dict[str, Any] | None = None  # the content of a file message
    # The event as read (kept by the ledger, so a restart can run it again).
    source: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    # The bot's unfinished answer to it (a stream's first event) that a re-answer finishes.
    resume: str = ""
    # The event it replies to (a thread's fallback reply is none): its text goes with it.
    reply_to: str = ""
    # The message whose turn this re-answers: an edit's original, the message a 🔁 is for.
    replaces: str = ""
    # A 🔁's: the bot's answer reacted to (the message it answers is found in its turn).
    regenerates: str = ""

    @property
    def is_message(self) -> bool:
        return self.kind in (Kind.MESSAGE, Kind.REGENERATE)

    @property
    def is_reanswer(self) -> bool:
        """An edit or a 🔁: the message of its turn answered again."""
        return bool(self.replaces) or self.kind is Kind.REGENERATE

    @property
    def turn(self) -> str:
        """The conversation turn it is: its own, or the one of the message it re-answers."""
        return self.replaces or self.event_id

    def resuming(self, answer_event: str) -> Incoming:
        return replace(self, resume=answer_event) if answer_event else self


IGNORED = Incoming(Kind.IGNORED)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _timestamp(value: Any) -> int:
    # bool is an int to Python; a JSON true is no timestamp.
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def is_edit(content: dict[str, Any]) -> bool:
    relates = content.get("m.relates_to")
    return isinstance(relates, dict) and relates.get("rel_type") == "m.replace"


def edited(content: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(the original's id, the new content) of an edit; None when it is malformed."""
    original = content["m.relates_to"].get("event_id")
    new = content.get("m.new_content")
    if not isinstance(original, str) or not isinstance(new, dict) or _malformed(new):
        return None
    return original, new


def _malformed(content: dict[str, Any]) -> bool:
    """A field present with the wrong type: the event is skipped, not guessed at."""
    relates = content.get("m.relates_to", {})
    texts = (content.get(key, "") for key in ("body", "format", "formatted_body"))
    return not isinstance(relates, dict) or not all(isinstance(t, str) for t in texts)


def trimmed(content: dict[str, Any]) -> dict[str, Any]:
    """``content`` without its reply fallback (the quoted ``> <@sender> …`` lines and the
    ``<mx-reply>`` block), as a client shows it; the same rule mautrix applies live."""
    relates = content.get("m.relates_to")
    reply = relates.get("m.in_reply_to") if isinstance(relates, dict) else None
    if not isinstance(reply, dict) or not isinstance(reply.get("event_id"), str):
        return content
    out = dict(content)
    body = content.get("body")
    if isinstance(body, str) and body.startswith(("> <", "> * <")) and "\n" in body:
        lines = body.split("\n")
        first = next((i for i, line in enumerate(lines) if not line.startswith("> ")), len(lines))
        out["body"] = "\n".join(lines[first:]).strip()  # one slice: a huge quote costs once
    html = content.get("formatted_body")
    if isinstance(html, str) and content.get("format") == "org.matrix.custom.html":
        out["formatted_body"] = _HTML_FALLBACK.sub("", html)
    return out


def replied_to(content: dict[str, Any]) -> str:
    """The id of the event a message replies to; "" for none, and for the reply a client
    adds to a thread's message only for clients without threads (``is_falling_back``)."""
    relates = content.get("m.relates_to")
    if not isinstance(relates, dict) or relates.get("is_falling_back") is True:
        return ""
    reply = relates.get("m.in_reply_to")
    event_id = reply.get("event_id") if isinstance(reply, dict) else None
    return event_id if isinstance(event_id, str) else ""


def command_name(body: str) -> str:
    words = body[len(COMMAND_PREFIX) :].split(maxsplit=1)
    return words[0].lower() if words else ""


def classify(event: Any, bot_id: str) -> Incoming:
    """What ``event`` (a room event as JSON) is: a message to answer (an edit of one, a 🔁
    on an answer), a command, or nothing."""
    if not isinstance(event, dict) or event.get("type") not in (MESSAGE_TYPE, REACTION_TYPE):
        return IGNORED
    content, sender = event.get("content"), _str(event.get("sender"))
    event_id = _str(event.get("event_id"))
    if not isinstance(content, dict) or not sender or not event_id or sender == bot_id:
        return IGNORED
    found = Incoming(
        Kind.MESSAGE, event_id=event_id, room_id=_str(event.get("room_id")) or "",
        sender=sender, timestamp=_timestamp(event.get("origin_server_ts")), source=event,
    )  # fmt: skip
    if event["type"] == REACTION_TYPE:
        return _reaction(found, content)
    return _message(found, content if event.get(TRIMMED) else trimmed(content))


def _reaction(found: Incoming, content: dict[str, Any]) -> Incoming:
    """A 🔁 on an event (the bot's answer, the turn decides): regenerate it."""
    relates = content.get("m.relates_to")
    if not isinstance(relates, dict) or relates.get("rel_type") != "m.annotation":
        return IGNORED
    target = relates.get("event_id")
    if not reaction_is(relates.get("key"), REGENERATE) or not isinstance(target, str):
        return IGNORED
    return replace(found, kind=Kind.REGENERATE, regenerates=target)


def _message(found: Incoming, content: dict[str, Any]) -> Incoming:
    if _malformed(content):
        return IGNORED
    replaces = ""
    if is_edit(content):
        edit = edited(content)
        if edit is None or edit[1].get("msgtype") not in TEXT_MSGTYPES:
            return IGNORED  # an edit of a file's caption is no new question
        replaces, content = edit
    msgtype, body = content.get("msgtype"), _str(content.get("body"))
    if msgtype not in ANSWERED_MSGTYPES:
        return IGNORED
    is_file = msgtype in FILE_MSGTYPES
    if body is None and not is_file:
        return IGNORED
    found = replace(
        found, body=body or "", file=content if is_file else None, replaces=replaces,
        reply_to="" if replaces else replied_to(content),
    )  # fmt: skip
    if not is_file and found.body.startswith(COMMAND_PREFIX):
        if msgtype != "m.text" or replaces:  # an edit runs no command, nor does an emote
            return IGNORED  # commands are plain text
        return replace(found, kind=Kind.COMMAND, command=command_name(found.body))
    return found


def reaction_is(key: Any, emoji: str) -> bool:
    """Whether a reaction's key is ``emoji``, with or without the presentation selector."""
    return isinstance(key, str) and key.replace(VARIATION, "").strip() == emoji


def as_json(evt: MessageEvent | ReactionEvent) -> dict[str, Any]:
    """A live event in the form ``classify`` reads (mautrix trimmed its reply fallback)."""
    return {
        TRIMMED: True,
        "type": str(evt.type),
        "event_id": evt.event_id,
        "room_id": evt.room_id,
        "sender": evt.sender,
        "origin_server_ts": evt.timestamp,
        "content": evt.content.serialize(),
    }


def answered_ids(events: list[Any], bot_id: str) -> set[str]:
    """The ids of the events the bot's messages among ``events`` say they answer."""
    found = set()
    for event in events:
        content = event.get("content") if isinstance(event, dict) else None
        if isinstance(content, dict) and event.get("sender") == bot_id:
            answered = content.get(ANSWERS)
            if isinstance(answered, str):
                found.add(answered)
    return found
