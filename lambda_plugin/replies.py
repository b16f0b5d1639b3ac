"""Getting an answer into a room: Markdown to Matrix HTML, splitting past the event size
limit, and streaming as throttled edits."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mautrix.util import markdown

# Matrix caps an event at 64 KiB of JSON; body and HTML both count, and HTML can be about
# twice the Markdown. 12 KB of Markdown per event leaves room for both and the envelope.
CHUNK_BYTES = 12_000
MAX_EVENT_JSON = 60_000  # under the 65,536-byte event limit, with room for the envelope
_FENCE = re.compile(r"^\s*(```+|~~~+)\s*[\w+#.-]{0,30}\s*$")
STREAM_CURSOR = " …"


def notice_content(text: str) -> dict[str, Any]:
    """An m.notice (other bots don't answer those) with the Markdown rendered as HTML."""
    # No mentions: an echoed "@room" or user id in an answer pings nobody.
    content: dict[str, Any] = {"msgtype": "m.notice", "body": text, "m.mentions": {}}
    html = markdown.render(text)
    if html.strip() and html.strip() != f"<p>{text.strip()}</p>" and html.strip() != text.strip():
        content["format"] = "org.matrix.custom.html"
        content["formatted_body"] = html
    return content


def edit_content(event_id: str, text: str) -> dict[str, Any]:
    # The fallback for clients without edits is the plain text only: the HTML is carried
    # once, in m.new_content, so an edit is hardly bigger than the message it replaces.
    return {
        "msgtype": "m.notice",
        "body": f"* {text}",
        "m.new_content": notice_content(text),
        "m.relates_to": {"rel_type": "m.replace", "event_id": event_id},
        "m.mentions": {},
    }


def event_size(text: str) -> int:
    """Bytes of the bigger of the two events that can carry ``text`` (a notice, an edit)."""
    edit = edit_content("$" + "x" * 43, text)
    return max(len(json.dumps(notice_content(text))), len(json.dumps(edit)))


def split_answer(text: str, limit: int = CHUNK_BYTES) -> list[str]:
    """Pieces that each fit one event, as sent: Markdown split by bytes first, and any piece
    whose rendered HTML and JSON escaping still make it too big split again, finer."""
    pieces = []
    for piece in split_text(text, limit):
        if limit <= 1000 or event_size(piece) <= MAX_EVENT_JSON:
            pieces.append(piece)
        else:
            pieces.extend(split_answer(piece, limit // 2))
    return pieces


def split_text(text: str, limit: int = CHUNK_BYTES) -> list[str]:
    """Cuts text into pieces of at most ``limit`` UTF-8 bytes, at paragraph, line or word
    boundaries where it can; a code block cut in two is closed and reopened. Nothing is lost."""
    if len(text.encode()) <= limit:
        return [text]
    pieces: list[str] = []
    rest = text
    fence: str | None = None  # the opening fence line of a code block cut at the last piece
    while rest:
        head = (fence + "\n") if fence else ""
        budget = limit - len(head.encode()) - 8  # room for a closing fence
        if len(rest.encode()) <= budget:
            pieces.append(head + rest)
            break
        cut = _cut_point(rest, budget)
        piece, rest = rest[:cut], rest[cut:].lstrip("\n")
        body = head + piece
        fence = _open_fence(body)
        if fence:
            body = body.rstrip("\n") + "\n```"
        pieces.append(body)
    return pieces


def _cut_point(text: str, budget: int) -> int:
    """The largest index whose prefix fits ``budget`` bytes, moved back to a boundary."""
    low, high = 0, len(text)
    while low < high:  # binary search on characters for the byte budget
        mid = (low + high + 1) // 2
        if len(text[:mid].encode()) <= budget:
            low = mid
        else:
            high = mid - 1
    window = text[:low]
    for separator in ("\n\n", "\n", " "):
        at = window.rfind(separator)
        if at > low // 2:
            return at + len(separator)
    return max(low, 1)


def _open_fence(text: str) -> str | None:
    """The opening line of a code block left open at the end of ``text``, if any. Only a
    short fence line counts, so a long line that merely starts with backticks never gets
    repeated at the head of every later piece."""
    fence = None
    for line in text.splitlines():
        if _FENCE.match(line):
            fence = None if fence else line.strip()
    return fence


# Rendering Markdown is pure Python and costs about 2 ms per KB; on every delta of a long
# answer that adds up to minutes. So nothing is rendered for a delta unless an edit is due,
# and after each render the next waits at least RENDER_SHARE times as long as it took:
# rendering stays under about a tenth of the stream's time, however fast the deltas come.
RENDER_SHARE = 10


class StreamingReply:
    """Shows an answer while it streams: one message, edited at most once per interval,
    ending with the whole answer (split into more messages past the size limit).

    The first text is sent at once; each later edit when the interval has passed since the
    last one tried. A partial that would not fit one event is skipped (the final answer is
    split instead), measured on the very content that would be sent.
    """

    def __init__(
        self,
        send: Callable[[dict[str, Any]], Awaitable[str]],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        send_partial: Callable[[dict[str, Any]], Awaitable[str]] | None = None,
        resume: str | None = None,
        started: Callable[[str], Awaitable[None]] | None = None,
        send_first: Callable[[dict[str, Any]], Awaitable[str]] | None = None,
    ) -> None:
        self.send = send
        # Partials may go another way (one that does not wait out an outage: the next
        # partial replaces a lost one); a failed partial is skipped, never fatal.
        self.send_partial = send_partial or send
        self.interval_s = interval_s
        self.clock = clock
        # An unfinished answer of an earlier attempt (a stop mid-stream): edited, not doubled.
        self.event_id: str | None = resume or None
        self.started = started  # told the first event's id, once sent
        # The first event again, as the same transaction as a try that failed (it may have
        # reached the homeserver): waits out an outage. None: ``send``.
        self.send_first = send_first or send
        self.first_tried = False
        self.last_edit: float | None = None  # when the last partial was rendered
        self.wait_s = interval_s  # until the next may be
        self.edits = 0
        self.streamed_chars = 0  # of the longest text streamed so far (for cut answers)
        self.shown = ""  # the text of the last partial sent
        self.last_piece: tuple[str, str] = ("", "")  # (event id, text) once finished

    async def partial(self, text_so_far: str) -> None:
        self.streamed_chars = max(self.streamed_chars, len(text_so_far))
        if not text_so_far.strip() or len(text_so_far.encode()) > CHUNK_BYTES:
            return  # past one event: the final answer will be split instead
        now = self.clock()
        if self.last_edit is not None and now - self.last_edit < self.wait_s:
            return  # throttled, before any rendering: a delta costs the same at any length
        started = time.perf_counter()
        shown = text_so_far + STREAM_CURSOR
        if self.event_id is None:
            content = notice_content(shown)
        else:
            content = edit_content(self.event_id, shown)
        fits = len(json.dumps(content)) <= MAX_EVENT_JSON
        self.last_edit = now
        self.wait_s = max(self.interval_s, RENDER_SHARE * (time.perf_counter() - started))
        if not fits:
            return
        try:
            if self.event_id is None:
                self.first_tried = True
                # Fails fast (the agent's stream must not wait); every try of the first
                # event carries one transaction id, so one that did reach the homeserver
                # comes back as itself rather than as a second, forgotten event.
                self.event_id = await self.send_partial(content)
                if self.started is not None:
                    await self.started(self.event_id)
            else:
                await self.send_partial(content)
                self.edits += 1
        except Exception:  # the homeserver stumbled: the next partial or the answer follows
            return
        self.shown = text_so_far

    async def interrupt(self, note: str) -> None:
        """Marks an unfinished answer as cut off (never left looking as if it streams on);
        a failure to say so is left alone: a re-answer edits it again."""
        if self.event_id is None:
            return
        text = f"{self.shown}\n\n{note}" if self.shown.strip() else note
        try:
            await self.send_partial(edit_content(self.event_id, text))
        except Exception:
            return

    async def finish(
        self, text: str, send_last: Callable[[dict[str, Any]], Awaitable[str]] | None = None
    ) -> list[str]:
        """Sends the whole answer; returns the ids of the messages that hold it. The last
        piece goes through ``send_last`` when given (what marks the answer finished: a stop
        between two pieces leaves it unfinished, to be answered again)."""
        pieces = split_answer(text)
        ids = []
        if self.event_id is None and self.first_tried:  # the lost try's event, if it exists
            self.event_id = await self.send_first(notice_content(pieces[0] + STREAM_CURSOR))
            if self.started is not None:
                await self.started(self.event_id)
        for number, piece in enumerate(pieces):
            send = send_last if send_last and number == len(pieces) - 1 else self.send
            if number == 0 and self.event_id is not None:
                await send(edit_content(self.event_id, piece))
                ids.append(self.event_id)
            else:
                ids.append(await send(notice_content(piece)))
        self.last_piece = (ids[-1], pieces[-1])
        return ids
