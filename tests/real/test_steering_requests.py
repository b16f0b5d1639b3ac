"""Steering an OpenAI-compatible agent from the room, proved by what the agent was sent (the
local test server records every request), on the real stack (both engines): an edit of the
latest message replaces its turn and the answer is edited in place; a reply sends the text
replied to as a quote, the client's fallback left out; the owner's 🛑 stops a stream at its
source within 5 s and keeps the message for !retry; in a shared room, another member's edits,
🔁 and 🛑 change nothing."""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_asyncio

from devstack.matrix import Event, MatrixUser
from devstack.stack import Deployment
from lambda_plugin.intake import ABOUT, ANSWERING, ANSWERS, REGENERATE, STOP
from tests.servers.openai_server import OpenAIServer

from .helpers import ANSWER_TIMEOUT, bot_messages, notice_text, onboard
from .test_in_room_control import edit_of, reaction

pytestmark = pytest.mark.real
AGENT = "steered"
STOP_WITHIN_S = 5.0
INTERRUPTED = "_(interrupted)_"
CHAT_PATH = "/v1/chat/completions"


@pytest_asyncio.fixture(scope="module")
async def agent(stack: Deployment):
    """An OpenAI-compatible server as the agent ``steered``; the plugin streams from it
    (``"stream": true``): in "ok" mode, three pieces at once."""
    server = OpenAIServer()
    url = await server.start()
    await stack.configure(
        {
            "agents": {
                "registry": {
                    AGENT: {
                        "backend": "openai", "base_url": url, "model": "test-model",
                        "timeout_s": 120,
                    }
                }
            },
            "replies": {"stream_edit_interval_s": 0.3},
        }
    )  # fmt: skip
    yield server
    await server.stop()


@pytest.fixture
def steered(agent: OpenAIServer):
    """The module's server, set back to its defaults after each test."""
    yield agent
    agent.mode, agent.chunks, agent.chunk_delay_s, agent.reply_text = "ok", 3, 0.0, None
    agent.release.set()


async def steered_chat(stack: Deployment, new_user, prefix: str) -> tuple[MatrixUser, str]:
    user = await new_user(prefix)
    got = await onboard(user, stack)
    assert AGENT in notice_text(await user.command(got.room, f"!agent {AGENT}", stack.bot_id))
    return user, got.room


def relation(event: Event) -> dict[str, Any]:
    return event["content"].get("m.relates_to") or {}


def is_edit_of(event: Event, event_id: str) -> bool:
    return (
        relation(event).get("rel_type") == "m.replace"
        and relation(event).get("event_id") == event_id
    )


def edits_of(user: MatrixUser, room: str, bot: str, event_id: str, mark=None) -> list[Event]:
    """The bot's edits of its event ``event_id`` after ``mark``, in timeline order."""
    return [
        e for e in user.events_since(room, mark) if e["sender"] == bot and is_edit_of(e, event_id)
    ]


def first_event(answer: Event) -> str:
    """The event the user sees an answer as: a streamed one's first event, which it edits."""
    return relation(answer)["event_id"] if relation(answer).get("rel_type") == "m.replace" else answer["event_id"]  # fmt: skip


def text_of(event: Event) -> str:
    content = event["content"]
    return (content.get("m.new_content") or content)["body"]


async def final_answer(
    user: MatrixUser, room: str, bot: str, event_id: str, mark=None, timeout: float = ANSWER_TIMEOUT
) -> Event:
    """The bot's event that says it answers ``event_id`` (a streamed answer's last edit)."""
    return await user.wait_for_event(
        room, lambda e: e["sender"] == bot and e["content"].get(ANSWERS) == event_id, mark, timeout
    )


async def first_of_stream(user: MatrixUser, room: str, bot: str, event_id: str, mark=None) -> Event:
    """The first event of the bot's streamed answer to ``event_id``, once it streams on (an
    edit of it arrived)."""
    first = await user.wait_for_event(
        room,
        lambda e: e["sender"] == bot and e["content"].get(ANSWERING) == event_id
        and relation(e).get("rel_type") != "m.replace",
        mark, ANSWER_TIMEOUT,
    )  # fmt: skip
    await user.wait_until(
        lambda: edits_of(user, room, bot, first["event_id"], mark), ANSWER_TIMEOUT, "a stream"
    )
    return first


def chat_requests(server: OpenAIServer, seen: int) -> list[dict[str, Any]]:
    """The chat completion requests the agent got after its first ``seen`` requests."""
    return [r.json for r in server.requests[seen:] if r.path == CHAT_PATH]


def turns(request: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in request["messages"]]


async def test_an_edit_replaces_the_turn_it_edits_and_the_answer_in_place(
    stack: Deployment, new_user, steered: OpenAIServer
) -> None:
    user, room = await steered_chat(stack, new_user, "edit")
    bot = stack.bot_id
    m1 = await user.send_text(room, "alpha")
    await final_answer(user, room, bot, m1)
    m2 = await user.send_text(room, "beta")
    answer = first_event(await final_answer(user, room, bot, m2))
    await user.sync_once(0)
    mark, seen = user.mark(), len(steered.requests)

    edit = await user.send(room, edit_of(m2, "gamma"))
    again = await final_answer(user, room, bot, edit, mark)
    assert is_edit_of(again, answer) and text_of(again) == "reply to: gamma"
    # The agent was asked once, the edited text as the last user turn, instead of "beta".
    [request] = chat_requests(steered, seen)
    assert turns(request) == [
        ("user", "alpha"), ("assistant", "reply to: alpha"), ("user", "gamma"),
    ]  # fmt: skip
    # In place: every event the bot sent since edits the one answer; no new message.
    await user.sync_once(0)
    sent = [e for e in user.events_since(room, mark) if e["sender"] == bot]
    assert sent and all(is_edit_of(e, answer) for e in sent), sent
    named = [e["event_id"] for e in bot_messages(user, room, bot) if m2 in (
        e["content"].get(ANSWERING), e["content"].get(ANSWERS))]  # fmt: skip
    assert named == [answer]

    # The conversation holds the edited turn, not both: the next request says so.
    seen = len(steered.requests)
    m3 = await user.send_text(room, "delta")
    assert text_of(await final_answer(user, room, bot, m3)) == "reply to: delta"
    [request] = chat_requests(steered, seen)
    assert turns(request) == [
        ("user", "alpha"), ("assistant", "reply to: alpha"),
        ("user", "gamma"), ("assistant", "reply to: gamma"), ("user", "delta"),
    ]  # fmt: skip


def reply_of(room: str, sender: str, event_id: str, quoted: str, text: str) -> dict[str, Any]:
    """A reply as Element sends it with its fallback: the quoted lines (the first naming
    the sender) before the text, and an ``<mx-reply>`` block in the HTML."""
    lines = quoted.split("\n")
    fallback = "\n".join([f"> <{sender}> {lines[0]}", *(f"> {line}" for line in lines[1:])])
    html = (
        f'<mx-reply><blockquote><a href="https://matrix.to/#/{room}/{event_id}">In reply to</a> '
        f'<a href="https://matrix.to/#/{sender}">{sender}</a><br>{"<br>".join(lines)}'
        f"</blockquote></mx-reply>{text}"
    )
    return {
        "msgtype": "m.text", "body": f"{fallback}\n\n{text}",
        "format": "org.matrix.custom.html", "formatted_body": html,
        "m.relates_to": {"m.in_reply_to": {"event_id": event_id}},
    }  # fmt: skip


@pytest.mark.parametrize("target", ["own-message", "streamed-answer"])
async def test_a_reply_sends_the_quote_and_the_text_without_the_fallback(
    stack: Deployment, new_user, steered: OpenAIServer, target: str
) -> None:
    """A reply to the user's own earlier message, or to the bot's streamed answer (which the
    user sees as its final text: the first event, edited): the agent gets that text quoted,
    then the new text, and none of the fallback's lines."""
    user, room = await steered_chat(stack, new_user, "reply")
    bot = stack.bot_id
    said = "first line\nsecond line"
    m1 = await user.send_text(room, said)
    answer = await final_answer(user, room, bot, m1)
    if target == "own-message":
        sender, event_id, quoted = user.user_id, m1, said
    else:
        sender, event_id, quoted = bot, first_event(answer), text_of(answer)
        assert quoted == f"reply to: {said}"
    seen = len(steered.requests)
    reply = await user.send(room, reply_of(room, sender, event_id, quoted, "why so?"))
    expected = "> " + quoted.replace("\n", "\n> ") + "\n\nwhy so?"
    assert text_of(await final_answer(user, room, bot, reply)) == f"reply to: {expected}"
    [request] = chat_requests(steered, seen)
    assert turns(request) == [
        ("user", said), ("assistant", f"reply to: {said}"), ("user", expected),
    ]  # fmt: skip


@pytest.mark.parametrize("target", ["answer", "question"])
async def test_the_owners_stop_ends_the_stream_within_5_s_and_keeps_the_message(
    stack: Deployment, new_user, steered: OpenAIServer, target: str
) -> None:
    """🛑 on the streaming answer (its first event) or on the message it answers: within
    5 s of the reaction's send the agent's stream is closed and the answer marked
    interrupted, its last edit; the message is kept, and !retry answers it in place."""
    user, room = await steered_chat(stack, new_user, "stop")
    bot = stack.bot_id
    steered.mode, steered.chunk_delay_s = "endless", 0.1
    await user.sync_once(0)
    mark = user.mark()
    question = await user.send_text(room, "go on forever")
    first = (await first_of_stream(user, room, bot, question, mark))["event_id"]
    left = len(steered.left)

    sent_at = time.monotonic()
    await user.send(room, reaction(first if target == "answer" else question, STOP), "m.reaction")
    # The plugin closed the agent's stream (the server saw its client go away) in time.
    cut_at = (await steered.wait_left(left + 1, timeout=STOP_WITHIN_S))[left]
    assert cut_at - sent_at < STOP_WITHIN_S

    def interrupted() -> Event | None:
        return next(
            (e for e in edits_of(user, room, bot, first, mark) if INTERRUPTED in text_of(e)), None
        )

    cut = await user.wait_until(interrupted, STOP_WITHIN_S, "the answer marked interrupted")
    assert time.monotonic() - sent_at < STOP_WITHIN_S
    stopped = await user.wait_for_event(
        room, lambda e: e["sender"] == bot and e["content"].get(ABOUT) == question, mark
    )
    assert "!retry" in notice_text(stopped)
    # Nothing edits the answer after its interrupted mark, up to a later reply of the bot's.
    await user.command(room, "!context", bot)
    assert edits_of(user, room, bot, first, mark)[-1]["event_id"] == cut["event_id"]
    assert not any(e["content"].get(ANSWERS) == question for e in user.events_since(room, mark))

    # Kept: !retry asks the agent again, and the interrupted answer is finished in place.
    steered.mode, steered.chunk_delay_s = "ok", 0.0
    seen = len(steered.requests)
    await user.sync_once(0)
    retry_mark = user.mark()
    await user.send_text(room, "!retry")
    again = await final_answer(user, room, bot, question, retry_mark)
    assert is_edit_of(again, first) and text_of(again) == "reply to: go on forever"
    [request] = chat_requests(steered, seen)
    assert turns(request)[-1] == ("user", "go on forever")


def naming(user: MatrixUser, room: str, bot: str, event_ids: set[str], mark) -> list[Event]:
    """The bot's events after ``mark`` that answer, work on, talk about or reply to one of
    ``event_ids``."""
    found = []
    for e in user.events_since(room, mark):
        content = e["content"]
        fields = {content.get(ANSWERS), content.get(ANSWERING), content.get(ABOUT)}
        fields.add((relation(e).get("m.in_reply_to") or {}).get("event_id"))
        if e["sender"] == bot and fields & event_ids:
            found.append(e)
    return found


def asked(server: OpenAIServer, seen: int) -> str:
    """All the text the agent was sent after its first ``seen`` requests."""
    return "\n".join(c for r in chat_requests(server, seen) for _, c in turns(r))


async def test_another_members_steering_changes_nothing_in_a_shared_room(
    stack: Deployment, new_user, steered: OpenAIServer
) -> None:
    """With ``access.shared_rooms`` on, a member is answered, but steers nothing: their edit
    of their own latest message, their edit naming the owner's latest message (forged), their
    🔁 on the latest answer, their 🛑 on a running answer (and on its message) change
    nothing: no request to the agent, no re-answer, no edit of an answer; it finishes."""
    owner, room = await steered_chat(stack, new_user, "host")
    bot = stack.bot_id
    guest = await new_user("guest")
    await stack.configure({"access": {"shared_rooms": True}})
    try:
        await owner.invite(room, guest.user_id)
        await guest.join(room)
        g1 = await guest.send_text(room, "the guest asks")
        guest_answer = first_event(await final_answer(owner, room, bot, g1))

        # Their edit of their own message, the latest: the owner's next message is answered
        # next (in turn, after the edit), and the agent was asked nothing else.
        await owner.sync_once(0)
        mark, seen = owner.mark(), len(steered.requests)
        own_edit = await guest.send(room, edit_of(g1, "the guest edits"))
        m1 = await owner.send_text(room, "the owner asks")
        owner_answer = first_event(await final_answer(owner, room, bot, m1, mark))
        [request] = chat_requests(steered, seen)
        assert turns(request)[-1] == ("user", "the owner asks")
        assert "the guest edits" not in asked(steered, seen)
        assert not edits_of(owner, room, bot, guest_answer, mark)
        assert not naming(owner, room, bot, {own_edit}, mark)

        # Their edit naming the owner's message and their 🔁 on its answer (both the
        # latest), and their 🛑 on the next answer while it streams, slowly (about 12 s).
        await owner.sync_once(0)
        mark, seen, left = owner.mark(), len(steered.requests), len(steered.left)
        forged = await guest.send(room, edit_of(m1, "forged words"))
        regenerate = await guest.send(room, reaction(owner_answer, REGENERATE), "m.reaction")
        steered.mode, steered.chunks, steered.chunk_delay_s = "stream", 30, 0.4
        m2 = await owner.send_text(room, "the owner asks again")
        running = (await first_of_stream(owner, room, bot, m2, mark))["event_id"]
        stops = [
            await guest.send(room, reaction(target, STOP), "m.reaction") for target in (running, m2)
        ]
        await owner.wait_for_event(room, lambda e: e["event_id"] == stops[-1], mark)
        after_stops = owner.mark()
        # It streams on after the 🛑s, and ends complete, not interrupted.
        await owner.wait_until(
            lambda: any(
                text_of(e).endswith(" …") for e in edits_of(owner, room, bot, running, after_stops)
            ),
            ANSWER_TIMEOUT, "the stream going on after the 🛑s",
        )  # fmt: skip
        done = await final_answer(owner, room, bot, m2, mark)
        assert is_edit_of(done, running) and text_of(done) == "reply to: the owner asks again"
        assert not any(INTERRUPTED in text_of(e) for e in edits_of(owner, room, bot, running))
        assert len(steered.left) == left
        [request] = chat_requests(steered, seen)
        assert turns(request)[-1] == ("user", "the owner asks again")
        assert "forged words" not in asked(steered, seen)
        # A later reply of the bot's: whatever the steering did is in the room by now.
        steered.mode = "ok"
        context = await owner.command(room, "!context", bot)
        assert "messages: 6" in notice_text(context)  # three questions, three answers
        assert not edits_of(owner, room, bot, owner_answer, mark)
        assert not edits_of(owner, room, bot, guest_answer, mark)
        assert not naming(owner, room, bot, {forged, regenerate, *stops}, mark)
        assert [e["event_id"] for e in bot_messages(owner, room, bot, mark)] == [
            running, context["event_id"],
        ]  # fmt: skip
        assert not any(e["content"].get(ABOUT) in (m1, m2) for e in owner.events_since(room, mark))
    finally:
        await stack.configure({"access": {"shared_rooms": False}})
