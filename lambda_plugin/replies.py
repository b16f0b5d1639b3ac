"""Getting an answer into a room: Markdown to Matrix HTML, splitting past the event size
limit, and streaming as throttled edits."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mautrix.util import markdown

from .crypto import sealed_size

# Matrix caps an event at 64 KiB of JSON; body and HTML both count, and HTML can be about
# twice the Markdown. 12 KB of Markdown per event leaves room for both and the envelope.
CHUNK_BYTES = 12_000
# Under the 65,536-byte event limit, with room for the envelope: the budget of an event's
# content as it is sent, in an encrypted room the m.room.encrypted content (``sealed_size``).
MAX_EVENT_JSON = 60_000
# A piece this small is not cut again: if its HTML still does not fit, it goes without.
MIN_CHUNK_BYTES = 1_000
_FENCE = re.compile(r"^\s*(```+|~~~+)\s*[\w+#.-]{0,30}\s*$")
STREAM_CURSOR = " …"
_SOME_EVENT = "$" + "x" * 43  # an event id's length, for measuring an edit before it is made


# Every ASCII punctuation character: each one backslash-escaped is a literal in CommonMark.
_MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
# What a link's URL may not hold as it is in Markdown (it would end or break the link).
_URL_BREAKERS = re.compile(r"[\s()<>\[\]\\`]")


def escape_markdown(text: str) -> str:
    """``text`` as Markdown that renders as exactly its characters: no markup, no link."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)


@dataclass(frozen=True)
class Verbatim:
    """A name as it is (a room's name is its owner's to set): escaped in the Markdown, so it
    adds no markup and no link; itself in the plain body."""

    text: str

    def markdown(self) -> str:
        return escape_markdown(self.text)

    def plain(self) -> str:
        return self.text


@dataclass(frozen=True)
class Link:
    """A room linked by its name: in the Markdown (so the HTML) an anchor on the name, in the
    plain body the name and the URL. The name is escaped: whatever it holds, it adds no
    markup and no other link."""

    name: str
    url: str

    def markdown(self) -> str:
        url = _URL_BREAKERS.sub(lambda m: f"%{ord(m.group()):02X}", self.url)
        return f"[{escape_markdown(self._label())}]({url})"

    def plain(self) -> str:
        return f"{self._label()} <{self.url}>"  # a URL in plain text, delimited (RFC 3986)

    def _label(self) -> str:
        return " ".join(self.name.split()) or self.url  # one line; never an empty anchor


# A value of a text shown one way in its Markdown (so its HTML), another in the plain body.
Shown = Verbatim | Link


def fit_count(lines: list[str], budget: int) -> int:
    """How many of ``lines`` (the first ones) fit ``budget`` bytes, each with its line break."""
    used = 0
    for count, line in enumerate(lines):
        used += len(line.encode()) + 2
        if used > budget:
            return count
    return len(lines)


def notice_content(text: str, html: bool = True, plain: str | None = None) -> dict[str, Any]:
    """An m.notice (other bots don't answer those) with the Markdown rendered as HTML
    (unless ``html`` is False: the text alone); ``plain``: the body, where it is not the
    Markdown itself (a text with links: the HTML has anchors, the body names and URLs)."""
    # No mentions: an echoed "@room" or user id in an answer pings nobody.
    text = _clean(text)
    body = text if plain is None else _clean(plain)
    content: dict[str, Any] = {"msgtype": "m.notice", "body": body, "m.mentions": {}}
    if not html:
        return content
    rendered = markdown.render(text)
    stripped = rendered.strip()
    if stripped and stripped != f"<p>{text.strip()}</p>" and stripped != text.strip():
        content["format"] = "org.matrix.custom.html"
        content["formatted_body"] = rendered
    return content


def edit_content(event_id: str, text: str, new: dict[str, Any] | None = None) -> dict[str, Any]:
    """An edit of ``event_id`` to ``text``; ``new``: its notice content, when already made."""
    # The fallback for clients without edits is the plain text only: the HTML is carried
    # once, in m.new_content, so an edit is hardly bigger than the message it replaces.
    return {
        "msgtype": "m.notice",
        "body": f"* {_clean(text)}",
        "m.new_content": notice_content(text) if new is None else new,
        "m.relates_to": {"rel_type": "m.replace", "event_id": event_id},
        "m.mentions": {},
    }


def _clean(text: str) -> str:
    """``text`` as valid Unicode: a lone surrogate (an agent's JSON may hold one, and it has
    no UTF-8) becomes "?" rather than an event the homeserver refuses."""
    return text if text.isascii() else text.encode("utf-8", "replace").decode()


def content_size(content: dict[str, Any], sealed: bool = False) -> int:
    """Bytes of ``content`` as it is sent: its JSON, or with ``sealed`` (an encrypted room)
    the encrypted event's content that carries it (bounded from above)."""
    size = len(json.dumps(content))  # what goes out, and what mautrix encrypts
    return sealed_size(size) if sealed else size


def _bigger(text: str, notice: dict[str, Any], sealed: bool) -> int:
    """The size of the bigger of the two events that carry ``notice``: itself, an edit."""
    edit = edit_content(_SOME_EVENT, text, notice)
    return max(content_size(notice, sealed), content_size(edit, sealed))


def event_size(text: str, sealed: bool = False) -> int:
    """Bytes of the bigger of the two events that can carry ``text`` (a notice, an edit)."""
    return _bigger(text, notice_content(text), sealed)


def fitting_notice(text: str, sealed: bool = False) -> dict[str, Any]:
    """The notice content of ``text`` such that it, and an edit to it, fit one event as sent:
    without the HTML when with it they would not (a piece ``split_answer`` does not cut
    finer; a partial with a note added)."""
    notice = notice_content(text)
    if "formatted_body" in notice and _bigger(text, notice, sealed) > MAX_EVENT_JSON:
        return notice_content(text, html=False)
    return notice


def split_answer(text: str, limit: int = CHUNK_BYTES, sealed: bool = False) -> list[str]:
    """Pieces that each fit one event, as sent (``sealed``: encrypted): Markdown split by
    bytes first, and any piece whose rendered HTML and JSON escaping still make it too big
    split again, finer (down to ``MIN_CHUNK_BYTES``; past that it goes without its HTML)."""
    return [piece for piece, _ in answer_pieces(text, limit, sealed)]


def answer_pieces(
    text: str, limit: int = CHUNK_BYTES, sealed: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """``split_answer``'s pieces, each with the notice content that carries it (and fits, as
    does an edit to it). Each piece is rendered once; one too big without its HTML is cut
    finer unrendered."""
    pieces = []
    for piece in split_text(text, limit):
        plain = notice_content(piece, html=False)
        if _bigger(piece, plain, sealed) <= MAX_EVENT_JSON:
            notice = notice_content(piece)
            if _bigger(piece, notice, sealed) <= MAX_EVENT_JSON:
                pieces.append((piece, notice))
                continue
        if limit <= MIN_CHUNK_BYTES:
            pieces.append((piece, plain))
        else:
            pieces.extend(answer_pieces(piece, limit // 2, sealed))
    return pieces


def split_text(text: str, limit: int = CHUNK_BYTES) -> list[str]:
    """Cuts text into pieces of at most ``limit`` UTF-8 bytes, at paragraph, line or word
    boundaries where it can; a code block cut in two is closed and reopened. Nothing is lost.
    Each piece costs about its own size (the rest is never copied or encoded whole)."""
    if _fits(text, limit):
        return [text]
    pieces: list[str] = []
    at = 0  # where the rest of the text starts
    fence: str | None = None  # the opening fence line of a code block cut at the last piece
    while at < len(text):
        head = (fence + "\n") if fence else ""
        budget = max(limit - _bytes(head) - 8, 4)  # room for a closing fence; a character
        window = text[at : at + budget + 1]  # every character is a byte at least
        if at + len(window) >= len(text) and _fits(window, budget):
            pieces.append(head + window)
            break
        cut = _cut_point(window, budget)
        body = head + window[:cut]
        at += cut
        while text.startswith("\n", at):
            at += 1
        fence = _open_fence(body)
        if fence:
            body = body.rstrip("\n") + "\n```"
        pieces.append(body)
    return pieces


def _bytes(text: str) -> int:
    """UTF-8 bytes of ``text`` (a lone surrogate counted as 3, never an error)."""
    return len(text.encode("utf-8", "surrogatepass"))


def _fits(text: str, budget: int) -> bool:
    return len(text) <= budget and _bytes(text) <= budget


def _cut_point(text: str, budget: int) -> int:
    """The largest index whose prefix fits ``budget`` bytes, moved back to a boundary."""
    low, high = 0, min(len(text), budget)
    while low < high:  # binary search on characters for the byte budget
        mid = (low + high + 1) // 2
        if _bytes(text[:mid]) <= budget:
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


class _Growth:
    """What the stream needs to know of the answer so far for each delta without reading it
    all again: its length in characters and UTF-8 bytes, and whether it is more than
    whitespace, counted on what each delta adds (the text so far only grows). Counting stops
    past one event's bytes: a longer text is never shown while it streams."""

    def __init__(self) -> None:
        self.chars = 0
        self.bytes = 0
        self.blank = True

    def add(self, text: str) -> None:
        if len(text) < self.chars:  # not the counted text grown: counted again
            self.chars, self.bytes, self.blank = 0, 0, True
        if self.bytes <= CHUNK_BYTES:
            new = text[self.chars :]
            self.bytes += _bytes(new)
            self.blank = self.blank and not new.strip()
        self.chars = len(text)

    @property
    def showable(self) -> bool:
        return not self.blank and self.bytes <= CHUNK_BYTES


class StreamingReply:
    """Shows an answer while it streams: one message, edited at most once per interval,
    ending with the whole answer (split into more messages past the size limit).

    The first text is sent at once; each later edit when the interval has passed since the
    last one tried. A partial that would not fit one event is skipped (the final answer is
    split instead), measured on the very content that would be sent: encrypted, when
    ``encrypted()`` says the room is (or can't tell). A delta costs what it adds; the whole
    text is rendered and measured only for an edit that is due.
    """

    def __init__(
        self,
        send: Callable[[dict[str, Any]], Awaitable[str]],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        send_partial: Callable[[dict[str, Any]], Awaitable[str]] | None = None,
        resume: str | None = None,
        resumes_finished: bool = False,
        started: Callable[[str], Awaitable[None]] | None = None,
        send_first: Callable[[dict[str, Any]], Awaitable[str]] | None = None,
        encrypted: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.send = send
        # Partials may go another way (one that does not wait out an outage: the next
        # partial replaces a lost one); a failed partial is skipped, never fatal.
        self.send_partial = send_partial or send
        self.interval_s = interval_s
        self.clock = clock
        # An unfinished answer of an earlier attempt (a stop mid-stream): edited, not doubled.
        self.event_id: str | None = resume or None
        # ``resume`` is a finished answer (a re-answer edits it): cut off only once this
        # attempt has shown something in it, else it stays the answer it was.
        self.resumes_finished = resumes_finished
        self.started = started  # told the first event's id, once sent
        # The first event again, as the same transaction as a try that failed (it may have
        # reached the homeserver): waits out an outage. None: ``send``.
        self.send_first = send_first or send
        # Whether the room is encrypted now (asked when an event is due; None: never).
        self.encrypted = encrypted
        self.first_tried = False
        self.last_edit: float | None = None  # when the last partial was rendered
        self.wait_s = interval_s  # until the next may be
        self.edits = 0
        self.streamed_chars = 0  # of the longest text streamed so far (for cut answers)
        self.growth = _Growth()
        self.shown = ""  # the text of the last partial sent
        self.last_piece: tuple[str, str] = ("", "")  # (event id, text) once finished
        self.sealed = False  # whether the finished answer was measured as encrypted
        self.first_piece = ""  # the finished answer's first event: what a re-answer edits

    async def partial(self, text_so_far: str) -> None:
        self.streamed_chars = max(self.streamed_chars, len(text_so_far))
        self.growth.add(text_so_far)
        if not self.growth.showable:
            return  # nothing but whitespace, or past one event: the answer will be split
        now = self.clock()
        if self.last_edit is not None and now - self.last_edit < self.wait_s:
            return  # throttled, before any rendering: a delta costs what it adds
        content = await self._render(text_so_far, now)
        if content is None:
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

    async def _render(self, text: str, now: float) -> dict[str, Any] | None:
        """The partial's content, or None when it would not fit one event as sent; the next
        render waits for the interval, or longer after a slow render."""
        sealed = await self._sealed()
        started = time.perf_counter()
        shown = text + STREAM_CURSOR
        if self.event_id is None:
            content = notice_content(shown)
        else:
            content = edit_content(self.event_id, shown)
        fits = content_size(content, sealed) <= MAX_EVENT_JSON
        self.last_edit = now
        self.wait_s = max(self.interval_s, RENDER_SHARE * (time.perf_counter() - started))
        return content if fits else None

    async def _sealed(self) -> bool:
        """Whether what is sent now goes out encrypted; a room whose encryption can't be
        told is measured as encrypted (the smaller budget, right either way)."""
        if self.encrypted is None:
            return False
        try:
            return await self.encrypted()
        except Exception:
            return True

    async def interrupt(self, note: str) -> None:
        """Marks an unfinished answer as cut off (never left looking as if it streams on);
        a failure to say so is left alone: a re-answer edits it again."""
        if self.event_id is None or (self.resumes_finished and not self.shown):
            return
        text = f"{self.shown}\n\n{note}" if self.shown.strip() else note
        try:
            notice = fitting_notice(text, await self._sealed())
            await self.send_partial(edit_content(self.event_id, text, notice))
        except Exception:
            return

    async def finish(
        self, text: str, send_last: Callable[[dict[str, Any]], Awaitable[str]] | None = None
    ) -> list[str]:
        """Sends the whole answer; returns the ids of the messages that hold it. The last
        piece goes through ``send_last`` when given (what marks the answer finished: a stop
        between two pieces leaves it unfinished, to be answered again)."""
        self.sealed = sealed = await self._sealed()
        pieces = answer_pieces(text, sealed=sealed)
        ids = []
        if self.event_id is None and self.first_tried:  # the lost try's event, if it exists
            first = fitting_notice(pieces[0][0] + STREAM_CURSOR, sealed)
            self.event_id = await self.send_first(first)
            if self.started is not None:
                await self.started(self.event_id)
        for number, (piece, notice) in enumerate(pieces):
            send = send_last if send_last and number == len(pieces) - 1 else self.send
            if number == 0 and self.event_id is not None:
                await send(edit_content(self.event_id, piece, notice))
                ids.append(self.event_id)
            else:
                ids.append(await send(notice))
        self.last_piece = (ids[-1], pieces[-1][0])
        self.first_piece = ids[0]
        return ids

    def edit_last(self) -> dict[str, Any]:
        """An edit that repeats the answer's last piece as it was sent (``last_piece``): what
        marks the answer finished once the agent's files followed it."""
        event_id, text = self.last_piece
        return edit_content(event_id, text, fitting_notice(text, self.sealed))
