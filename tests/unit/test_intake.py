"""Intake: classify() sorts room events into messages, commands and ignored ones, never raising."""

from __future__ import annotations

from typing import Any

import pytest
from mautrix.types import EventType, MessageEvent, MessageType, TextMessageEventContent

from lambda_plugin.intake import (
    IGNORED,
    TRIMMED,
    Incoming,
    Kind,
    as_json,
    classify,
    command_name,
    trimmed,
)

BOT = "@lambda:example.org"
USER = "@alice:example.org"
ROOM = "!room:example.org"


def event(content: Any = None, **fields: Any) -> dict[str, Any]:
    """A well-formed m.room.message event from USER; ``fields`` override top-level keys."""
    found: dict[str, Any] = {
        "type": "m.room.message",
        "event_id": "$ev1",
        "room_id": ROOM,
        "sender": USER,
        "origin_server_ts": 1_700_000_000_000,
        "content": {"msgtype": "m.text", "body": "hello"} if content is None else content,
    }
    found.update(fields)
    return found


def text(
    body: Any, msgtype: Any = "m.text", extra: dict[str, Any] | None = None, **fields: Any
) -> dict[str, Any]:
    """A message event: ``extra`` goes into its content, ``fields`` to the top level."""
    return event({"msgtype": msgtype, "body": body, **(extra or {})}, **fields)


# --- messages -------------------------------------------------------------------------------


def test_text_is_a_message() -> None:
    got = classify(text("hello there"), BOT)
    assert got == Incoming(
        Kind.MESSAGE,
        event_id="$ev1",
        room_id=ROOM,
        sender=USER,
        body="hello there",
        timestamp=1_700_000_000_000,
    )
    assert got.is_message
    assert got.file is None
    assert got.command == ""


def test_emote_is_a_message() -> None:
    got = classify(text("waves", "m.emote"), BOT)
    assert got.kind is Kind.MESSAGE
    assert got.body == "waves"
    assert got.file is None


@pytest.mark.parametrize("msgtype", ["m.file", "m.image", "m.audio", "m.video"])
def test_file_message_keeps_its_content(msgtype: str) -> None:
    content = {
        "msgtype": msgtype,
        "body": "report.pdf",
        "url": "mxc://example.org/abc",
        "info": {"size": 1234, "mimetype": "application/pdf"},
    }
    got = classify(event(content), BOT)
    assert got.kind is Kind.MESSAGE
    assert got.is_message
    assert got.body == "report.pdf"
    assert got.file == content
    assert got.command == ""


def test_file_without_body_is_a_message_with_empty_body() -> None:
    content = {"msgtype": "m.image", "url": "mxc://example.org/abc"}
    got = classify(event(content), BOT)
    assert got.kind is Kind.MESSAGE
    assert got.body == ""
    assert got.file == content


def test_file_whose_body_starts_with_bang_is_a_message() -> None:
    content = {"msgtype": "m.file", "body": "!help.txt", "url": "mxc://example.org/abc"}
    got = classify(event(content), BOT)
    assert got.kind is Kind.MESSAGE
    assert got.command == ""
    assert got.body == "!help.txt"
    assert got.file == content


def test_missing_room_id_gives_empty_room() -> None:
    ev = text("hi")
    del ev["room_id"]
    assert classify(ev, BOT).room_id == ""
    assert classify(text("hi", room_id=["!x"]), BOT).room_id == ""


def test_reply_relation_is_still_a_message() -> None:
    got = classify(text("hi", extra={"m.relates_to": {"m.in_reply_to": {"event_id": "$a"}}}), BOT)
    assert got.kind is Kind.MESSAGE


# --- ignored ----------------------------------------------------------------------------------


def test_notice_is_ignored() -> None:
    assert classify(text("an answer", "m.notice"), BOT) is IGNORED


@pytest.mark.parametrize(
    "msgtype", ["m.location", "m.server_notice", "m.key.verification.request", ""]
)
def test_other_msgtypes_are_ignored(msgtype: str) -> None:
    assert classify(text("x", msgtype), BOT) is IGNORED


def test_missing_msgtype_is_ignored() -> None:
    assert classify(event({"body": "x"}), BOT) is IGNORED


def test_bots_own_message_is_ignored() -> None:
    assert classify(text("hello", sender=BOT), BOT) is IGNORED
    assert classify(text("!help", sender=BOT), BOT) is IGNORED


def test_other_event_types_are_ignored() -> None:
    assert classify(text("hi", type="m.room.member"), BOT) is IGNORED
    assert classify(text("hi", type="m.reaction"), BOT) is IGNORED
    ev = text("hi")
    del ev["type"]
    assert classify(ev, BOT) is IGNORED


EDIT = {"rel_type": "m.replace", "event_id": "$orig"}


@pytest.mark.parametrize("msgtype", ["m.text", "m.emote"])
def test_an_edit_is_its_new_text_for_the_message_it_replaces(msgtype: str) -> None:
    ev = text("* hello", msgtype, extra={
        "m.relates_to": EDIT, "m.new_content": {"msgtype": msgtype, "body": "hello"},
    })  # fmt: skip
    found = classify(ev, BOT)
    assert (found.kind, found.body, found.replaces, found.turn) == (
        Kind.MESSAGE, "hello", "$orig", "$orig",
    )  # fmt: skip
    assert found.event_id == "$ev1" and not found.reply_to


@pytest.mark.parametrize(
    "new_content",
    [
        None,  # no new content: nothing to answer
        "hello",  # not an object
        {"msgtype": "m.text", "body": 5},  # a body of the wrong type
        {"msgtype": "m.text", "body": "hi", "formatted_body": ["x"]},
        {"msgtype": "m.file", "body": "a.pdf", "url": "mxc://x/y"},  # a file's caption
        {"msgtype": "m.notice", "body": "hello"},
        {"msgtype": "m.text", "body": "!clear"},  # an edit into a command runs nothing
    ],
)
def test_an_edit_that_is_no_question_is_ignored(new_content: Any) -> None:
    extra: dict[str, Any] = {"m.relates_to": EDIT}
    if new_content is not None:
        extra["m.new_content"] = new_content
    assert classify(text("* hello", extra=extra), BOT) is IGNORED


def test_an_edit_naming_no_event_is_ignored() -> None:
    relates = {"rel_type": "m.replace", "event_id": 7}
    extra = {"m.relates_to": relates, "m.new_content": {"msgtype": "m.text", "body": "hi"}}
    assert classify(text("* hi", extra=extra), BOT) is IGNORED


def test_edit_of_a_command_is_ignored() -> None:
    ev = text("* !new x", extra={"m.relates_to": EDIT})
    assert classify(ev, BOT) is IGNORED
    ev = text("!new x", extra={"m.relates_to": EDIT})
    assert classify(ev, BOT) is IGNORED


@pytest.mark.parametrize(
    ("key", "rel_type", "target", "regenerates"),
    [
        ("🔁", "m.annotation", "$answer", True),
        ("🔁\ufe0f", "m.annotation", "$answer", True),  # with the presentation selector
        ("👍", "m.annotation", "$answer", False),
        ("🛑", "m.annotation", "$answer", False),  # a stop is live only (reactions.py)
        ("🔁", "m.reference", "$answer", False),
        ("🔁", "m.annotation", None, False),
        (None, "m.annotation", "$answer", False),
    ],
)
def test_a_regenerate_reaction(key: Any, rel_type: str, target: Any, regenerates: bool) -> None:
    ev = {
        "type": "m.reaction", "event_id": "$r", "sender": "@alice:example.org",
        "room_id": "!room:example.org", "origin_server_ts": 5,
        "content": {"m.relates_to": {"rel_type": rel_type, "event_id": target, "key": key}},
    }  # fmt: skip
    found = classify(ev, BOT)
    if not regenerates:
        assert found is IGNORED
        return
    assert (found.kind, found.regenerates, found.event_id, found.timestamp) == (
        Kind.REGENERATE, "$answer", "$r", 5,
    )  # fmt: skip
    assert found.is_message and not found.body


def test_the_bots_own_reaction_is_ignored() -> None:
    ev = {
        "type": "m.reaction", "event_id": "$r", "sender": BOT, "room_id": "!room:example.org",
        "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$a", "key": "🔁"}},
    }  # fmt: skip
    assert classify(ev, BOT) is IGNORED


def test_other_relation_is_not_an_edit() -> None:
    ev = text("hi", extra={"m.relates_to": {"rel_type": "m.thread", "event_id": "$root"}})
    assert classify(ev, BOT).kind is Kind.MESSAGE


# --- commands -------------------------------------------------------------------------------


def test_help_is_a_command() -> None:
    got = classify(text("!help"), BOT)
    assert got.kind is Kind.COMMAND
    assert got.command == "help"
    assert got.body == "!help"
    assert not got.is_message
    assert got.event_id == "$ev1"
    assert got.sender == USER
    assert got.room_id == ROOM


def test_command_name_is_lower_case_and_arguments_stay_in_body() -> None:
    got = classify(text("!NEW name"), BOT)
    assert got.kind is Kind.COMMAND
    assert got.command == "new"
    assert got.body == "!NEW name"


def test_bang_alone_is_an_empty_command() -> None:
    got = classify(text("!"), BOT)
    assert got.kind is Kind.COMMAND
    assert got.command == ""


def test_bang_then_space_is_an_empty_command() -> None:
    got = classify(text("!   "), BOT)
    assert got.kind is Kind.COMMAND
    assert got.command == ""


def test_leading_space_is_no_command() -> None:
    assert classify(text(" !help"), BOT).kind is Kind.MESSAGE


def test_emote_starting_with_bang_is_ignored() -> None:
    assert classify(text("!help", "m.emote"), BOT) is IGNORED


@pytest.mark.parametrize(
    ("body", "name"),
    [
        ("!help", "help"),
        ("!NEW name", "new"),
        ("!", ""),
        ("!  ", ""),
        ("!Lambda  status now", "lambda"),
        ("!retry\nmore", "retry"),
        ("!ÄRGER x", "ärger"),
    ],
)
def test_command_name(body: str, name: str) -> None:
    assert command_name(body) == name


# --- hostile input --------------------------------------------------------------------------


@pytest.mark.parametrize("ev", [None, [], "m.room.message", 42, 1.5, True, ("a", "b"), {1, 2}])
def test_event_not_a_dict_is_ignored(ev: Any) -> None:
    assert classify(ev, BOT) is IGNORED


def test_empty_dict_is_ignored() -> None:
    assert classify({}, BOT) is IGNORED


@pytest.mark.parametrize("content", [None, [], ["m.text", "hi"], "hello", 7, True])
def test_content_not_a_dict_is_ignored(content: Any) -> None:
    ev = event()
    ev["content"] = content
    assert classify(ev, BOT) is IGNORED


def test_missing_content_is_ignored() -> None:
    ev = event()
    del ev["content"]
    assert classify(ev, BOT) is IGNORED


@pytest.mark.parametrize("relates", [None, [], [{"rel_type": "m.replace"}], "m.replace", 3])
def test_malformed_relation_is_skipped_not_guessed_at(relates: Any) -> None:
    # SPEC §5: an event with a wrong type anywhere is skipped (what it relates to is unknown).
    assert classify(text("hi", extra={"m.relates_to": relates}), BOT) is IGNORED


def test_malformed_relation_on_a_command_is_skipped() -> None:
    assert classify(text("!help", extra={"m.relates_to": "m.replace"}), BOT) is IGNORED


@pytest.mark.parametrize("body", [42, 1.5, None, {"text": "hi"}, ["hi"], True])
def test_text_body_not_a_string_is_ignored(body: Any) -> None:
    assert classify(text(body), BOT) is IGNORED
    assert classify(text(body, "m.emote"), BOT) is IGNORED


def test_text_without_body_is_ignored() -> None:
    assert classify(event({"msgtype": "m.text"}), BOT) is IGNORED


@pytest.mark.parametrize("body", [42, None, {"text": "!help"}, ["!help"]])
def test_file_body_not_a_string_is_skipped(body: Any) -> None:
    content = {"msgtype": "m.file", "body": body, "url": "mxc://example.org/abc"}
    assert classify(event(content), BOT) is IGNORED


def test_file_without_body_is_a_message_with_an_empty_body() -> None:
    content = {"msgtype": "m.file", "url": "mxc://example.org/abc"}
    got = classify(event(content), BOT)
    assert got.kind is Kind.MESSAGE
    assert got.body == ""
    assert got.file == content


@pytest.mark.parametrize("msgtype", [["m.text"], {"m.text": 1}, 1, None, True])
def test_msgtype_not_a_string_is_ignored(msgtype: Any) -> None:
    assert classify(text("hello", msgtype), BOT) is IGNORED


@pytest.mark.parametrize("sender", [None, 42, ["@alice:example.org"], {"id": USER}, ""])
def test_sender_missing_or_not_a_string_is_ignored(sender: Any) -> None:
    assert classify(text("hello", sender=sender), BOT) is IGNORED
    ev = text("hello")
    del ev["sender"]
    assert classify(ev, BOT) is IGNORED


@pytest.mark.parametrize("event_id", [None, 42, ["$ev"], {"id": "$ev"}, ""])
def test_event_id_missing_or_not_a_string_is_ignored(event_id: Any) -> None:
    assert classify(text("hello", event_id=event_id), BOT) is IGNORED
    ev = text("hello")
    del ev["event_id"]
    assert classify(ev, BOT) is IGNORED


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("1700000000000", 0),
        (1.7e12, 0),
        (1700000000000.0, 0),
        (True, 0),
        (False, 0),
        (None, 0),
        ([1], 0),
        ({"ts": 1}, 0),
        (10**30, 10**30),
        (-5, -5),
        (0, 0),
        (1_700_000_000_123, 1_700_000_000_123),
    ],
)
def test_timestamp_is_an_int_or_zero(ts: Any, expected: int) -> None:
    got = classify(text("hello", origin_server_ts=ts), BOT)
    assert got.kind is Kind.MESSAGE
    assert got.timestamp == expected
    assert type(got.timestamp) is int


def test_missing_timestamp_is_zero() -> None:
    ev = text("hello")
    del ev["origin_server_ts"]
    assert classify(ev, BOT).timestamp == 0


def test_bot_id_not_a_string_does_not_crash() -> None:
    assert classify(text("hello"), None).kind is Kind.MESSAGE  # type: ignore[arg-type]


# --- as_json --------------------------------------------------------------------------------


def make_message_event(body: str, msgtype: MessageType = MessageType.TEXT) -> MessageEvent:
    return MessageEvent(
        type=EventType.ROOM_MESSAGE,
        room_id=ROOM,
        event_id="$live",
        sender=USER,
        timestamp=1_700_000_000_555,
        content=TextMessageEventContent(msgtype=msgtype, body=body),
    )


def test_as_json_shape() -> None:
    got = as_json(make_message_event("hello"))
    assert got == {
        TRIMMED: True,
        "type": "m.room.message",
        "event_id": "$live",
        "room_id": ROOM,
        "sender": USER,
        "origin_server_ts": 1_700_000_000_555,
        "content": {"msgtype": "m.text", "body": "hello"},
    }


def test_as_json_round_trip_message() -> None:
    got = classify(as_json(make_message_event("hello")), BOT)
    assert got == Incoming(
        Kind.MESSAGE,
        event_id="$live",
        room_id=ROOM,
        sender=USER,
        body="hello",
        timestamp=1_700_000_000_555,
    )


def test_as_json_round_trip_command() -> None:
    got = classify(as_json(make_message_event("!Retry now")), BOT)
    assert got.kind is Kind.COMMAND
    assert got.command == "retry"
    assert got.event_id == "$live"


def test_as_json_round_trip_notice_is_ignored() -> None:
    assert classify(as_json(make_message_event("hi", MessageType.NOTICE)), BOT) is IGNORED


def test_as_json_round_trip_edit_is_the_new_text() -> None:
    evt = make_message_event("hello")
    evt.content.set_edit("$orig")
    found = classify(as_json(evt), BOT)
    assert (found.kind, found.body, found.replaces) == (Kind.MESSAGE, "hello", "$orig")


# --- reply fallbacks: one trimming for live events and caught-up ones -----------------------

REPLY = {"m.relates_to": {"m.in_reply_to": {"event_id": "$earlier"}}}
FALLBACK = "> <@lambda:example.org> an answer\n> second line\n\n"
HTML_FALLBACK = "<mx-reply><blockquote>an answer</blockquote></mx-reply>"


def reply_content(body: str, html: str | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"msgtype": "m.text", "body": FALLBACK + body, **REPLY}
    if html is not None:
        content.update(format="org.matrix.custom.html", formatted_body=HTML_FALLBACK + html)
    return content


def live(content: dict[str, Any]) -> dict[str, Any]:
    """The event as the live path reads it: mautrix parses and trims it, as_json writes it."""
    evt = MessageEvent.deserialize(event(content, event_id="$live"))
    evt.content.trim_reply_fallback()
    return as_json(evt)


@pytest.mark.parametrize(
    ("body", "kind", "command"),
    [("!clear", Kind.COMMAND, "clear"), ("what about this?", Kind.MESSAGE, ""),
     ("> <@x:y> my own quote\nand text", Kind.MESSAGE, "")],
)  # fmt: skip
def test_a_caught_up_reply_is_what_it_is_live(body: str, kind: Kind, command: str) -> None:
    raw = classify(event(reply_content(body), event_id="$live"), BOT)
    from_live = classify(live(reply_content(body)), BOT)
    assert (raw.kind, raw.command, raw.body) == (kind, command, body.strip())
    assert (from_live.kind, from_live.command, from_live.body) == (raw.kind, raw.command, raw.body)


def test_a_stored_live_event_read_again_is_not_trimmed_twice() -> None:
    # The ledger keeps the live form; a restart classifies it again from there.
    first = live(reply_content("> <@x:y> my own quote\nand text"))
    assert classify(first, BOT).body == "> <@x:y> my own quote\nand text"


def test_the_html_fallback_is_trimmed_too() -> None:
    got = trimmed(reply_content("hi", html="<b>hi</b>"))
    assert (got["body"], got["formatted_body"]) == ("hi", "<b>hi</b>")


@pytest.mark.parametrize(
    "content",
    [
        {"msgtype": "m.text", "body": FALLBACK + "no relation"},
        {"msgtype": "m.text", "body": FALLBACK + "x", "m.relates_to": {"m.in_reply_to": "$e"}},
        {"msgtype": "m.text", "body": FALLBACK + "x", "m.relates_to": {"m.in_reply_to": {}}},
        {"msgtype": "m.text", "body": "> quoted, no sender\nx", **REPLY},
        {"msgtype": "m.text", "body": "> <@a:b> one line only", **REPLY},
        {"msgtype": "m.text", "body": None, **REPLY},
    ],
)
def test_what_is_not_a_reply_fallback_stays(content: dict[str, Any]) -> None:
    assert trimmed(content) == content


def test_a_huge_fallback_is_trimmed_in_one_pass() -> None:
    # 100,000 quoted lines: a line at a time from the front was quadratic.
    body = "> <@x:y> a\n" + "> q\n" * 100_000 + "\nthe text"
    content = {"msgtype": "m.text", "body": body, **REPLY}
    assert trimmed(content)["body"] == "the text"
