"""Re-answers in the room's turn over a real Store: an edit of the owner's latest message
and a 🔁 on the latest answer answer that message again (the answer edited in place);
anything else changes nothing or gets one notice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lambda_plugin.db import Store
from lambda_plugin.intake import ANSWERING, ANSWERS, Incoming, classify
from lambda_plugin.ledger import Fate
from tests.unit.test_conversation import BOT, ROOM, USER, Env, message

OTHER = "@mallory:example.org"


def edit(event_id: str, original: str, body: str, ts: int, sender: str = USER) -> Incoming:
    event = {
        "type": "m.room.message", "event_id": event_id, "sender": sender, "room_id": ROOM,
        "origin_server_ts": ts, "content": {
            "msgtype": "m.text", "body": f"* {body}",
            "m.new_content": {"msgtype": "m.text", "body": body},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        },
    }  # fmt: skip
    return classify(event, BOT)


def regenerate(event_id: str, answer: str, ts: int, sender: str = USER) -> Incoming:
    event = {
        "type": "m.reaction", "event_id": event_id, "sender": sender, "room_id": ROOM,
        "origin_server_ts": ts,
        "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": answer, "key": "🔁"}},
    }  # fmt: skip
    return classify(event, BOT)


def sent(incoming: Incoming) -> dict[str, Any]:
    assert incoming.source is not None
    return incoming.source


def bot_event(event_id: str, content: dict[str, Any], sender: str = BOT) -> dict[str, Any]:
    return {"type": "m.room.message", "event_id": event_id, "sender": sender, "content": content}


async def answered(env: Env, incoming: Incoming) -> None:
    """The message sent, seen in the room and answered."""
    env.room.events[incoming.event_id] = sent(incoming)
    await env.stage.message(ROOM, incoming, retried=False)


async def test_an_edit_of_the_latest_message_answers_its_new_text_in_place(store: Store) -> None:
    env = Env(store)
    await answered(env, message("$1", "what is 2+2", ts=10))
    await env.stage.message(ROOM, edit("$e", "$1", "what is 3+3", ts=20), retried=False)
    _, again = env.answerer.given
    assert (again.event_id, again.body, again.replaces) == ("$e", "what is 3+3", "$1")
    assert again.resume == "$answer$1"  # the first answer's event, edited in place
    assert await env.state("$e") == Fate.ANSWERED.value
    assert await env.state("$1") == Fate.ANSWERED.value  # its answer stays what it was
    # A second edit replaces the same turn, in the same answer event.
    await env.stage.message(ROOM, edit("$e2", "$1", "what is 4+4", ts=30), retried=False)
    assert env.answerer.given[-1].replaces == "$1" and env.answerer.given[-1].resume == "$answer$1"


async def test_an_edit_of_an_older_message_gets_one_notice(store: Store) -> None:
    env = Env(store)
    await answered(env, message("$1", "first", ts=10))
    await answered(env, message("$2", "second", ts=20))
    await env.stage.message(ROOM, edit("$e", "$1", "first, edited", ts=30), retried=False)
    assert env.answerer.asked == ["$1", "$2"]
    assert env.notices.said == [("reanswer.older", "$e")]
    assert await env.state("$e") == Fate.REFUSED.value


@pytest.mark.parametrize(
    ("editor", "original_sender", "original_body"),
    [
        (OTHER, OTHER, "mine"),  # another member edits their own message: not the owner
        (USER, OTHER, "theirs"),  # an edit naming someone else's message
        (OTHER, USER, "the owner's"),  # someone else's "edit" of the owner's message
        (USER, USER, "!clear"),  # an edit of a command
    ],
)
async def test_an_edit_that_is_not_the_owners_of_their_message_changes_nothing(
    store: Store, editor: str, original_sender: str, original_body: str
) -> None:
    env = Env(store, access__shared_rooms=True)
    original = sent(message("$1", original_body, ts=10))
    env.room.events["$1"] = {**original, "sender": original_sender}
    await env.stage.message(ROOM, edit("$e", "$1", "changed", ts=20, sender=editor), retried=False)
    assert "$e" not in env.answerer.asked and env.notices.said == []
    assert await env.state("$e") == Fate.LEFT.value


async def test_an_edit_of_an_event_that_cannot_be_read_changes_nothing(store: Store) -> None:
    env = Env(store)
    await env.stage.message(ROOM, edit("$e", "$gone", "changed", ts=20), retried=False)
    assert env.answerer.asked == [] and await env.state("$e") == Fate.LEFT.value


async def test_a_kept_original_is_superseded_by_its_edits_answer(store: Store) -> None:
    env = Env(store)
    env.answerer.fates["$1"] = (Fate.KEPT, "agent")
    await answered(env, message("$1", "hi", ts=10))
    await env.stage.message(ROOM, edit("$e", "$1", "hello", ts=20), retried=False)
    assert await env.state("$1") == Fate.SUPERSEDED.value  # !retry never sends it again
    assert await env.ledger.kept(ROOM) == []
    assert env.answerer.given[-1].resume == ""  # it had no answer: a new one


async def test_a_regenerate_answers_the_newest_form_of_the_latest_message(store: Store) -> None:
    env = Env(store)
    await answered(env, message("$1", "tell a joke", ts=10))
    env.room.events["$answer$1"] = bot_event("$answer$1", {"body": "joke", ANSWERS: "$1"})
    await env.stage.message(ROOM, edit("$e", "$1", "tell a pun", ts=20), retried=False)
    await env.stage.message(ROOM, regenerate("$r", "$answer$1", ts=30), retried=False)
    again = env.answerer.given[-1]
    assert (again.event_id, again.body, again.replaces, again.resume) == (
        "$r", "tell a pun", "$1", "$answer$1",
    )  # fmt: skip
    assert await env.state("$r") == Fate.ANSWERED.value
    env.restart()  # a new process: the ledger still knows the turn
    await env.stage.message(ROOM, regenerate("$r2", "$answer$1", ts=40), retried=False)
    assert env.answerer.given[-1].body == "tell a pun"  # a 🔁 is no newer message


async def test_a_regenerate_of_a_forgotten_message_reads_it_from_the_room(store: Store) -> None:
    env = Env(store)  # a lost database: the room is all there is
    env.room.events["$1"] = sent(message("$1", "tell a joke", ts=10))
    env.room.events["$a"] = bot_event("$a", {"body": "jo", ANSWERING: "$1"})
    await env.stage.message(ROOM, regenerate("$r", "$a", ts=30), retried=False)
    again = env.answerer.given[-1]
    assert (again.body, again.replaces, again.resume) == ("tell a joke", "$1", "$a")


@pytest.mark.parametrize(
    ("target", "sender"),
    [
        (bot_event("$t", {"body": "x", ANSWERS: "$1"}, sender=OTHER), USER),  # forged answer
        (bot_event("$t", {"body": "a notice about it", "ai.lambda.matrix.about": "$1"}), USER),
        (bot_event("$t", {"body": "x", ANSWERS: "$1"}), OTHER),  # not the owner
        (bot_event("$t", {"body": "x", ANSWERS: 5}), USER),
    ],
)
async def test_a_regenerate_that_is_not_the_owners_on_an_answer_changes_nothing(
    store: Store, target: dict[str, Any], sender: str
) -> None:
    env = Env(store, access__shared_rooms=True)
    await answered(env, message("$1", "hi", ts=10))
    env.room.events["$t"] = target
    await env.stage.message(ROOM, regenerate("$r", "$t", ts=30, sender=sender), retried=False)
    assert env.answerer.asked == ["$1"] and env.notices.said == []
    assert await env.state("$r") == Fate.LEFT.value


async def test_a_regenerate_of_an_older_answer_gets_one_notice(store: Store) -> None:
    env = Env(store)
    await answered(env, message("$1", "one", ts=10))
    await answered(env, message("$2", "two", ts=20))
    env.room.events["$answer$1"] = bot_event("$answer$1", {"body": "x", ANSWERS: "$1"})
    await env.stage.message(ROOM, regenerate("$r", "$answer$1", ts=30), retried=False)
    assert env.answerer.asked == ["$1", "$2"]
    assert env.notices.said == [("reanswer.older", "$r")]


async def test_an_edit_reads_its_superseded_original_from_the_ledger(store: Store) -> None:
    """The queue dropped the original for its edit: the edit's turn finds the original in
    the ledger, so an outage of the room meanwhile costs neither."""
    env = Env(store)
    original = message("$1", "hi", ts=10)
    env.ledger.superseded(original)
    while await env.state("$1") != Fate.SUPERSEDED.value:
        await asyncio.sleep(0.01)
    env.room.down = True
    await env.stage.message(ROOM, edit("$e", "$1", "hello", ts=20), retried=False)
    again = env.answerer.given[-1]
    assert (again.event_id, again.body, again.replaces, again.resume) == ("$e", "hello", "$1", "")
    assert await env.state("$e") == Fate.ANSWERED.value


async def test_an_edit_the_room_cannot_be_read_for_is_kept_for_retry(store: Store) -> None:
    env = Env(store)
    env.room.events["$1"] = sent(message("$1", "hi", ts=10))
    env.room.down = True
    the_edit = edit("$e", "$1", "hello", ts=20)
    await env.stage.message(ROOM, the_edit, retried=False)
    assert env.answerer.asked == [] and env.notices.said == [("send.failed", "$e")]
    assert await env.state("$e") == Fate.KEPT.value
    env.room.down = False
    [kept] = await env.ledger.kept(ROOM)
    await env.stage.message(ROOM, kept, retried=True)  # !retry
    assert env.answerer.given[-1].body == "hello" and await env.state("$e") == Fate.ANSWERED.value


async def test_an_older_edit_gives_way_to_a_newer_one_of_the_same_message(store: Store) -> None:
    """Edits E1 (caught up) and E2 (live, seen meanwhile): E1 answers nothing, and no turn
    ends E2, which answers the newest text."""
    env = Env(store)
    await answered(env, message("$1", "v1", ts=10))
    newer = edit("$e2", "$1", "v3", ts=30)
    env.ledger.seen(newer)
    while await env.state("$e2") != Fate.SEEN.value:
        await asyncio.sleep(0.01)
    await env.stage.message(ROOM, edit("$e1", "$1", "v2", ts=20), retried=False)
    assert await env.state("$e1") == Fate.SUPERSEDED.value and env.answerer.asked == ["$1"]
    env.room.events["$answer$1"] = bot_event("$answer$1", {"body": "v1", ANSWERS: "$1"})
    await env.stage.message(ROOM, regenerate("$r", "$answer$1", ts=25), retried=False)
    assert env.answerer.given[-1].body == "v1"  # the 🔁 came before E2: E2 is not its form
    assert await env.state("$e2") == Fate.SEEN.value
    await env.stage.message(ROOM, newer, retried=False)
    assert env.answerer.given[-1].body == "v3" and await env.state("$e2") == Fate.ANSWERED.value


async def test_another_members_pending_edit_does_not_steer_the_owners_regenerate(
    store: Store,
) -> None:
    env = Env(store, access__shared_rooms=True)
    await answered(env, message("$1", "tell a joke", ts=10))
    env.room.events["$answer$1"] = bot_event("$answer$1", {"body": "joke", ANSWERS: "$1"})
    env.ledger.seen(edit("$forged", "$1", "say something rude", ts=20, sender=OTHER))
    while await env.state("$forged") != Fate.SEEN.value:
        await asyncio.sleep(0.01)
    await env.stage.message(ROOM, regenerate("$r", "$answer$1", ts=30), retried=False)
    assert env.answerer.given[-1].body == "tell a joke"
    assert await env.state("$r") == Fate.ANSWERED.value


@pytest.mark.parametrize(
    ("content", "sender", "replaced"),
    [
        ({"msgtype": "m.text", "body": "hi"}, USER, True),
        ({"msgtype": "m.file", "body": "a.pdf", "url": "mxc://example.org/a"}, USER, False),
        ({"msgtype": "m.audio", "body": "voice", "url": "mxc://example.org/v"}, USER, False),
        ({"msgtype": "m.text", "body": "hi"}, OTHER, False),
    ],
    ids=["text", "file", "voice", "another member's"],
)
async def test_the_queue_drops_for_an_edit_only_the_owners_text_it_edits(
    store: Store, content: dict[str, Any], sender: str, replaced: bool
) -> None:
    """A text edit naming a queued file is refused in its turn: the file stays queued."""
    env = Env(store, access__shared_rooms=True)
    event = {"type": "m.room.message", "event_id": "$1", "sender": sender, "room_id": ROOM,
             "origin_server_ts": 10, "content": content}  # fmt: skip
    earlier = classify(event, BOT)
    assert env.stage.supersedes(edit("$e", "$1", "changed", ts=20, sender=sender), earlier) is replaced


async def seen(env: Env, *incomings: Incoming) -> None:
    """Queued (seen in the ledger) and not run yet."""
    for incoming in incomings:
        env.ledger.seen(incoming)
    for incoming in incomings:
        while await env.state(incoming.event_id) != Fate.SEEN.value:
            await asyncio.sleep(0.01)


async def test_an_edit_with_a_newer_one_past_another_message_still_answers(store: Store) -> None:
    """A, edit E1 (the queue dropped A for it), B, edit E2: E2 is of an older message and
    gets its notice, so E1 must answer A's turn (not give way to E2)."""
    env = Env(store)
    original = message("$a", "v1", ts=10)
    env.room.events["$a"] = sent(original)
    env.ledger.superseded(original)
    e1, b, e2 = edit("$e1", "$a", "v2", ts=20), message("$b", "next", ts=30), edit("$e2", "$a", "v3", ts=40)
    await seen(env, b, e2)
    for incoming in (e1, b, e2):
        await env.stage.message(ROOM, incoming, retried=False)
    assert env.answerer.asked == ["$e1", "$b"] and env.answerer.given[0].body == "v2"
    assert env.notices.said == [("reanswer.older", "$e2")]


async def test_an_edit_after_a_command_is_answered_again(store: Store) -> None:
    """A, then !cancel or !clear, then an edit of A: a command is no newer message; the
    edit answers A's turn again (after !clear, in the conversation as it is now)."""
    env = Env(store)
    await answered(env, message("$1", "hi", ts=10))
    clear = classify({**sent(message("$c", "!clear", ts=15))}, BOT)
    assert await env.ledger.claim(clear)
    await env.ledger.end("$c", Fate.ANSWERED)
    await env.stage.message(ROOM, edit("$e", "$1", "hello", ts=20), retried=False)
    assert env.notices.said == [] and env.answerer.asked == ["$1", "$e"]


async def test_a_regenerate_retried_after_an_edit_does_not_bring_back_the_old_text(
    store: Store,
) -> None:
    """A 🔁 kept (over the rate), then an edit answered, then !retry: the 🔁 is superseded."""
    env = Env(store)
    await answered(env, message("$1", "v1", ts=10))
    env.room.events["$answer$1"] = bot_event("$answer$1", {"body": "a1", ANSWERS: "$1"})
    await env.stage.message(ROOM, edit("$e", "$1", "v2", ts=30), retried=False)
    await env.stage.message(ROOM, regenerate("$r", "$answer$1", ts=20), retried=True)
    assert env.answerer.asked == ["$1", "$e"]
    assert await env.state("$r") == Fate.SUPERSEDED.value
