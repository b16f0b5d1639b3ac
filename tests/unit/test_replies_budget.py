"""The size budget of an answer measured on what is sent (in an encrypted room: the
encrypted event), and streaming work that grows with each delta, not with the answer."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from mautrix.crypto.account import OlmAccount
from mautrix.crypto.encrypt_megolm import MegolmEncryptionMachine
from mautrix.crypto.sessions import OutboundGroupSession
from mautrix.types import EventType, RoomID

from lambda_plugin.intake import ANSWERING, ANSWERS
from lambda_plugin.notices import answering
from lambda_plugin.replies import (
    MAX_EVENT_JSON,
    StreamingReply,
    content_size,
    edit_content,
    notice_content,
    split_answer,
)

# Long ids (a room id may have 255 characters): the bound's allowances for them count.
ROOM = "!" + "r" * 200 + ":example.org"
EVENT = "$" + "e" * 43


class _Sealer:
    """Encrypts event content exactly as maubot's client does (mautrix's own Megolm
    encryption, with a real olm session): what a homeserver gets in an encrypted room."""

    def __init__(self) -> None:
        session = OutboundGroupSession(RoomID(ROOM))
        session.shared = True
        self.account = OlmAccount()
        self.client = SimpleNamespace(device_id="LAMBDADEVICE")
        self.log = logging.getLogger("test.sealer")
        self.crypto_store = SimpleNamespace(
            get_outbound_group_session=self._session, update_outbound_group_session=self._keep
        )
        self.session = session

    async def _session(self, room_id: RoomID) -> OutboundGroupSession:
        return self.session

    async def _keep(self, session: OutboundGroupSession) -> None:
        return None

    async def size(self, content: dict[str, Any]) -> int:
        """Bytes of the ``m.room.encrypted`` content that carries ``content``."""
        encrypt = MegolmEncryptionMachine._encrypt_megolm_event
        sealed = await encrypt(self, RoomID(ROOM), EventType.ROOM_MESSAGE, content)  # type: ignore[arg-type]
        return len(json.dumps(sealed.serialize()))


@pytest.fixture
def sealer() -> _Sealer:
    return _Sealer()


def html_answer(size: int = 12_000) -> str:
    """An answer of ``size`` bytes written in HTML (a model asked for a page): quotes, ``&``,
    angle brackets and non-ASCII grow in the rendered HTML and again in JSON. A 12 KB one is
    issue 20's: its final edit is about 52 KB in the clear (it fits) and 70 KB encrypted."""
    text = "<div>\n"
    for i in range(size):
        row = f'<p class="n">"§{i}" &amp; <b>"x"</b></p>\n'
        if len((text + row).encode()) > size:
            break
        text += row
    return text


def _texts() -> dict[str, str]:
    url = "https://example.org/" + "u" * 900
    amp = "https://example.org/?" + "&" * 400  # each & is 5 bytes in an href
    return {
        "html": html_answer(),
        "long html": html_answer(30_000),
        "cyrillic": "Привет, как дела? " * 2_000,
        "escaping": '<&>"' * 3000,
        "references": f"[r]: {url}\n\n" + "[x][r] " * 300,
        "ampersand references": f"[r]: {amp}\n\n" + "[x][r] " * 300,
        "control characters": "\x01" * 20_000,
    }


TEXTS = _texts()


def _mark(content: dict[str, Any]) -> dict[str, Any]:
    """The content as the answer stage sends it (``answering.Answerer._reply``)."""
    return answering(
        content, EVENT, ANSWERING if content.get("body", "").endswith("…") else ANSWERS
    )


@pytest.mark.parametrize("content", [
    notice_content("short"),
    notice_content(html_answer()),
    edit_content(EVENT, html_answer()),
    edit_content(EVENT, "ж" * 6_000),
    notice_content("\U0001f600" * 3_000),
], ids=["short", "html", "html edit", "cyrillic edit", "emoji"])  # fmt: skip
async def test_the_encrypted_size_is_bounded_closely(sealer: _Sealer, content: dict) -> None:
    """The bound is never below what mautrix's Megolm encryption makes of the content as the
    answer stage marks it, and not far above it either."""
    actual = await sealer.size(_mark(content))
    bound = content_size(content, sealed=True)
    assert actual <= bound <= actual + 2_500
    assert content_size(content) == len(json.dumps(content))  # in the clear: its JSON


def _final_texts(sent: list[dict[str, Any]]) -> list[str]:
    """What the room reads when the answer is done: each message as last edited."""
    final: dict[str, str] = {}
    for number, content in enumerate(sent):
        relation = content.get("m.relates_to") or {}
        if relation.get("rel_type") == "m.replace":
            final[relation["event_id"]] = content["m.new_content"]["body"]
        else:
            final[f"$e{number}"] = content["body"]
    return list(final.values())


def _room(sent: list[dict[str, Any]]) -> Callable[[dict[str, Any]], Awaitable[str]]:
    async def send(content: dict[str, Any]) -> str:
        sent.append(content)
        return f"$e{len(sent) - 1}"

    return send


async def _stream(text: str, reply: StreamingReply, now: list[float]) -> None:
    for end in range(50, len(text) + 1, max(1, len(text) // 12)):  # a dozen sizes
        now[0] += 2.0  # the interval has always passed: each partial is tried
        await reply.partial(text[:end])
    await reply.finish(text)


async def _yes() -> bool:
    return True


async def _unknown() -> bool:
    raise RuntimeError("the room's state could not be read")


@pytest.mark.parametrize("encrypted", [_yes, _unknown], ids=["encrypted", "unknown"])
@pytest.mark.parametrize("kind", list(TEXTS))
async def test_every_event_of_an_encrypted_answer_fits(
    sealer: _Sealer, kind: str, encrypted: Callable[[], Awaitable[bool]]
) -> None:
    """Partials, pieces and the final edit, each encrypted as sent, are within the limit, and
    the room reads the whole answer. A room whose encryption can't be told is measured as
    encrypted (the smaller budget)."""
    text, sent, now = TEXTS[kind], [], [0.0]
    reply = StreamingReply(_room(sent), 1.0, lambda: now[0], encrypted=encrypted)
    await _stream(text, reply, now)
    sizes = [await sealer.size(_mark(content)) for content in sent]
    assert max(sizes) <= MAX_EVENT_JSON, kind
    assert "".join("".join(_final_texts(sent)).split()) == "".join(text.split())
    last_id, last_text = reply.last_piece
    assert await sealer.size(_mark(reply.edit_last())) <= MAX_EVENT_JSON
    assert reply.edit_last()["m.new_content"]["body"] == last_text
    assert reply.edit_last()["m.relates_to"]["event_id"] == last_id


@pytest.mark.parametrize("kind", list(TEXTS))
async def test_every_event_of_a_plain_answer_fits(kind: str) -> None:
    text, sent, now = TEXTS[kind], [], [0.0]

    async def plain() -> bool:
        return False

    reply = StreamingReply(_room(sent), 1.0, lambda: now[0], encrypted=plain)
    await _stream(text, reply, now)
    assert max(len(json.dumps(_mark(content))) for content in sent) <= MAX_EVENT_JSON, kind
    assert "".join("".join(_final_texts(sent)).split()) == "".join(text.split())
    assert len(json.dumps(_mark(reply.edit_last()))) <= MAX_EVENT_JSON


def test_a_plain_room_keeps_the_bigger_pieces() -> None:
    """The encrypted budget is the smaller one; a plain room's answer is not cut as finely."""
    text = html_answer()
    assert len(split_answer(text)) == 1
    assert len(split_answer(text, sealed=True)) > 1


class _Watched(str):
    """A text that counts the characters the code looks at: each method called on it counts
    its whole length, each slice or concatenation what it returns."""

    seen = 0

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("__"):
            _Watched.seen += str.__len__(self)
        return super().__getattribute__(name)

    def __getitem__(self, key: Any) -> str:
        got = str.__getitem__(self, key)
        _Watched.seen += len(got)
        return got

    def __add__(self, other: str) -> str:
        got = str.__add__(self, other)
        _Watched.seen += len(got)
        return got

    def __contains__(self, other: object) -> bool:
        _Watched.seen += str.__len__(self)
        return str.__contains__(self, other)


@pytest.mark.parametrize("delta", ["ab c", "жж ж", " \n\n "], ids=["ascii", "cyrillic", "blank"])
@pytest.mark.parametrize("chars", [8_000, 40_000])
async def test_streaming_work_per_delta_is_the_delta(delta: str, chars: int) -> None:
    """Between two edits a delta costs what it adds: no method of the text so far (encode,
    strip, ...) runs over the whole of it. Counted in characters, not timed. 8,000 ASCII
    characters stay within one event (partials go on), the others pass it."""
    sent: list[dict[str, Any]] = []
    reply = StreamingReply(_room(sent), interval_s=3600.0, clock=lambda: 5.0)
    text = ""
    _Watched.seen = 0
    for _ in range(chars // len(delta)):
        text += delta
        await reply.partial(_Watched(text))
    # Quadratic work would be about chars² / 8 here (10⁸ for 40,000 characters).
    assert _Watched.seen <= 3 * chars, _Watched.seen
    assert len(sent) == (0 if delta.isspace() else 1)  # the first partial only: throttled
