"""Replies as context: the agent gets the replied-to event's text, quoted and bounded."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from lambda_plugin.answering import Answerer
from lambda_plugin.db import ChatRoomRow
from lambda_plugin.intake import classify, replied_to
from lambda_plugin.matrix import HomeserverError, Matrix
from lambda_plugin.quotes import quoted_text, text_of, with_quote

BOT = "@lambda:example.org"
ROOM, USER = "!chat:example.org", "@ann:example.org"
LOG = logging.getLogger("test.quotes")


def message(body: Any, msgtype: str = "m.text", **content: Any) -> dict[str, Any]:
    return {"type": "m.room.message", "sender": USER, "event_id": "$earlier",
            "content": {"msgtype": msgtype, "body": body, **content}}  # fmt: skip


class Events:
    """GET /event answers: the event, an error, or an encrypted one the crypto opens (or not)."""

    def __init__(self, event: dict[str, Any] | HomeserverError, opened: Any = None) -> None:
        self._event, self._opened = event, opened
        self.crypto = SimpleNamespace(open=self._open)
        self.asked: list[str] = []

    async def _open(self, room_id: str, raw: dict[str, Any]) -> Any:
        return self._opened

    opened_event = Matrix.opened_event  # the real one, over this fake's event and crypto

    async def event(self, room_id: str, event_id: str) -> dict[str, Any]:
        self.asked.append(event_id)
        if isinstance(self._event, HomeserverError):
            raise self._event
        return self._event


REPLY = {"m.in_reply_to": {"event_id": "$earlier"}}


@pytest.mark.parametrize(
    ("relates", "expected"),
    [
        (REPLY, "$earlier"),
        ({"rel_type": "m.thread", "event_id": "$root", "is_falling_back": True, **REPLY}, ""),
        ({"rel_type": "m.thread", "event_id": "$root", "is_falling_back": False, **REPLY}, "$earlier"),
        ({"m.in_reply_to": {"event_id": 5}}, ""),
        ({"m.in_reply_to": "$earlier"}, ""),
        ({}, ""),
        (None, ""),
    ],
)
def test_the_event_replied_to(relates: Any, expected: str) -> None:
    content = {"msgtype": "m.text", "body": "x", "m.relates_to": relates}
    assert replied_to(content) == expected


def test_classify_names_the_event_replied_to() -> None:
    reply = message("> <@x:y> old\n\nnew", **{"m.relates_to": REPLY})
    reply["event_id"] = "$reply"
    got = classify(reply, BOT)
    assert (got.body, got.reply_to) == ("new", "$earlier")


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (message("plain words"), "plain words"),
        (message("> <@x:y> older\n\nthe reply", **{"m.relates_to": REPLY}), "the reply"),
        (message("photo.png", "m.image"), "[file: photo.png]"),
        (message(None), ""),
        ({"type": "m.room.message", "content": "not a map"}, ""),
        ({"type": "m.room.member", "content": {"membership": "join"}}, ""),
        ({}, ""),
    ],
)
def test_the_text_of_an_event(event: dict[str, Any], text: str) -> None:
    assert text_of(event) == text


def edited(edit_sender: str = USER, edit_type: str = "m.room.message") -> dict[str, Any]:
    """A streamed answer as /event serves it: the original, its newest edit bundled."""
    edit = {"type": edit_type, "sender": edit_sender, "event_id": "$edit",
            "content": {"body": "* the whole answer", "m.new_content": {"msgtype": "m.text",
                        "body": "the whole answer"}}}  # fmt: skip
    return {**message("the wh …"), "unsigned": {"m.relations": {"m.replace": edit}}}


@pytest.mark.parametrize(
    ("source", "most", "quote"),
    [
        (Events(edited()), 2000, "the whole answer"),  # as the user sees it
        (Events(edited("@mallory:example.org")), 2000, "the wh …"),  # not its sender's edit
        (Events(edited(edit_type="m.room.encrypted"), opened=None), 2000, "the wh …"),
        (Events({**message("as sent"), "unsigned": "junk"}), 2000, "as sent"),
        (Events({**message("as sent"), "unsigned": {"m.relations": {"m.replace": 5}}}), 2000, "as sent"),
        (Events(message("what is 2+2?")), 2000, "what is 2+2?"),
        (Events(message("x" * 5000)), 10, "x" * 9 + "…"),
        (Events(HomeserverError(404, "M_NOT_FOUND", "gone")), 2000, ""),
        (Events({"type": "m.room.encrypted", "content": {}}, opened=message("secret")), 2000, "secret"),
        (Events({"type": "m.room.encrypted", "content": {}}, opened=None), 2000, ""),
    ],
)  # fmt: skip
async def test_the_quoted_text(source: Events, most: int, quote: str) -> None:
    assert await quoted_text(source, ROOM, "$earlier", most, LOG) == quote  # type: ignore[arg-type]


def test_the_quote_goes_before_the_text_as_markdown_quote_lines() -> None:
    assert with_quote("and then?", "line one\n\nline three") == (
        "> line one\n>\n> line three\n\nand then?"
    )
    assert with_quote("alone", "") == "alone"


async def test_the_agent_is_asked_with_the_quote() -> None:
    events = Events(message("the answer was 4"))
    settings = SimpleNamespace(
        max_quote_chars=2000, transcription_for=lambda agent: None, workspace_root=None
    )
    answerer = Answerer(
        settings=lambda: settings, log=LOG, mx=events, registry=None, agents=None,
        files=None, notices=None, voice=None, quota=None, ledger=None,
    )  # type: ignore[arg-type]  # fmt: skip
    row = ChatRoomRow(ROOM, USER, "C1", "Chat 1", "echo", "p1", False, False, 0)
    reply = message("> <@lambda:example.org> the answer was 4\n\nwhy?", **{"m.relates_to": REPLY})
    reply.update(event_id="$reply", room_id=ROOM)
    request = await answerer._request(row, None, classify(reply, BOT))  # type: ignore[arg-type]
    assert request is not None
    assert request.text == "> the answer was 4\n\nwhy?"
    assert events.asked == ["$earlier"]
