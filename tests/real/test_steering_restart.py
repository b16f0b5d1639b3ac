"""Steering while the plugin is down, on the real stack (plain and encrypted rooms, both
engines): an edit sent while the plugin was down is answered once, in its edited form (the
bot's answer edited in place, the turn replaced); a 🔁 on the latest answer sent while down
is applied once; a message sent and edited while down is answered once, in its edited form;
and a stop (maubot SIGKILLed, or the instance stopped) in the middle of a re-answer
finishes that re-answer once, in place.

"Down" is for real: the whole maubot process SIGKILLed (no ``stop()`` runs), or the plugin
instance stopped through maubot's management API (its client keeps syncing). Each case then
restarts once more and checks, by a fresh message's answer, that nothing was done twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from devstack.matrix import Event, MatrixUser
from devstack.stack import Deployment
from lambda_plugin.intake import ABOUT, ANSWERING, ANSWERS
from tests.servers.openai_server import OpenAIServer

from .helpers import ANSWER_TIMEOUT, answer_to, ask, bot_messages, notice_text, onboard
from .test_encryption import e2e_user, encrypted, need_crypto  # noqa: F401  (fixtures)
from .test_faults import slow  # noqa: F401  (the streaming agent, six seconds an answer)
from .test_in_room_control import edit_of, reaction

pytestmark = pytest.mark.real

STOPS = ["sigkill", "instance-stop"]
CASES = ["edited", "regenerated", "sent-and-edited"]
# A start: maubot up again (after a SIGKILL), reconciliation, the catch-up read and queued.
START_TIMEOUT = 300
REANSWER_TIMEOUT = 180


def echo(text: str, number: int) -> str:
    """The echo agent's whole answer to ``text`` as message ``number`` of its conversation."""
    return f"echo: {text}\n\n(message {number} in this conversation)"


async def down_and_up(
    stack: Deployment, how: str, while_down: Callable[[], Awaitable[None]] | None = None
) -> int:
    """Stops the plugin for real (``how``: maubot SIGKILLed, or the instance stopped), runs
    ``while_down``, starts it again and waits until it is ready: its start line, logged once
    the catch-up is queued and the queues open. Returns the log offset before the stop."""
    mark = stack.log_mark()
    if how == "sigkill":
        await stack.kill_server(while_down)
    else:
        await stack.maubot.set_started(stack.instance_id, False)
        try:
            if while_down is not None:
                await while_down()
        finally:
            await stack.maubot.set_started(stack.instance_id, True)
    stack.wait_for_log(
        f"@maubot.instance.{stack.instance_id}] Reconciled: ", after=mark, timeout=START_TIMEOUT
    )
    return mark


def caught_up(stack: Deployment, log_mark: int, event_ids: list[str]) -> None:
    """The start after ``log_mark`` caught each of ``event_ids`` up: they were handled by the
    restart, not live."""
    log = stack.maubot.log_text()[log_mark:]
    assert [i for i in event_ids if f"Catching up {i} " not in log] == []


def naming(user: MatrixUser, room: str, bot: str, event_ids: set[str], mark=None) -> list[Event]:
    """Every event of the bot after ``mark`` (edits included) that answers one of
    ``event_ids``, works on it, or is about it."""
    return [
        e for e in user.events_since(room, mark)
        if e["sender"] == bot
        and event_ids & {e["content"].get(f) for f in (ANSWERS, ANSWERING, ABOUT)}
    ]  # fmt: skip


def edits_of(user: MatrixUser, room: str, bot: str, event_id: str, mark=None) -> list[Event]:
    """The bot's edits of its event ``event_id`` after ``mark``."""
    return [
        e for e in user.events_since(room, mark)
        if e["sender"] == bot
        and (e["content"].get("m.relates_to") or {}).get("rel_type") == "m.replace"
        and e["content"]["m.relates_to"].get("event_id") == event_id
    ]  # fmt: skip


async def reanswer_of(user: MatrixUser, room: str, bot: str, answer: Event, by: str) -> Event:
    """Waits for the bot's edit of ``answer`` that names ``by`` as what it answers."""
    found = await user.wait_for_event(
        room,
        lambda e: e["sender"] == bot and e["content"].get(ANSWERS) == by,
        timeout=REANSWER_TIMEOUT,
    )
    relates = found["content"]["m.relates_to"]
    assert (relates["rel_type"], relates["event_id"]) == ("m.replace", answer["event_id"]), found
    return found


async def nothing_more_after_a_restart(
    user: MatrixUser, stack: Deployment, how: str, room: str, steered: set[str], number: int
) -> Event:
    """Restarts the same way again, waits until the plugin is ready, and has a fresh message
    answered as message ``number``: nothing the restart found was answered again (the log
    catches none of ``steered`` up). Returns the fresh message's answer."""
    await user.sync_once(0)
    before = {e["event_id"] for e in naming(user, room, stack.bot_id, steered)}
    mark = await down_and_up(stack, how)
    caught = [i for i in steered if f"Catching up {i} " in stack.maubot.log_text()[mark:]]
    assert not caught, caught
    _, fresh = await ask(user, room, "two", stack.bot_id)
    assert notice_text(fresh) == echo("two", number)
    await user.sync_once(0)
    after = {e["event_id"] for e in naming(user, room, stack.bot_id, steered)}
    assert after == before, after - before
    return fresh


async def steered_while_down(user: MatrixUser, stack: Deployment, how: str, case: str) -> None:
    sealed = getattr(user, "machine", None) is not None  # an E2EUser: an encrypted room
    got = await onboard(user, stack, encrypted=sealed)
    room, bot = got.room, stack.bot_id
    assert (await user.state_event(room, "m.room.encryption") is not None) == sealed
    first, answer = await ask(user, room, "one", bot)
    assert notice_text(answer) == echo("one", 1)
    await user.sync_once(0)
    mark = user.mark()
    sent: list[str] = []

    async def while_down() -> None:
        if case == "edited":
            sent.append(await user.send(room, edit_of(first, "uno")))
        elif case == "regenerated":
            sent.append(await user.send(room, reaction(answer["event_id"], "🔁"), "m.reaction"))
        else:  # a new message, and its edit, both while down
            sent.append(await user.send_text(room, "dos"))
            sent.append(await user.send(room, edit_of(sent[0], "deux")))

    log_mark = await down_and_up(stack, how, while_down)
    steered = set(sent)
    if case == "sent-and-edited":
        original, edit = sent
        # One answer, a new message (nothing to edit in place), to the edited text.
        new = await user.wait_until(
            lambda: next(
                (e for e in bot_messages(user, room, bot, mark)
                 if e["content"].get(ANSWERS) in steered), None,
            ),
            REANSWER_TIMEOUT,
            "the answer to the message or its edit",
        )  # fmt: skip
        assert notice_text(new) == echo("deux", 2)
        # Named as the answer to the edit (the form it answered), not to the original.
        assert new["content"][ANSWERS] == edit, (original, edit)
        await user.sync_once(0)
        assert [e["event_id"] for e in bot_messages(user, room, bot, mark)] == [new["event_id"]]
        assert [e["event_id"] for e in naming(user, room, bot, steered, mark)] == [new["event_id"]]
        assert not any(
            "echo: dos" in str(e["content"]) for e in user.events_since(room, mark)
        )  # the original text was never answered
        caught_up(stack, log_mark, sent)
        await nothing_more_after_a_restart(user, stack, how, room, steered, 3)
        return
    by = sent[0]
    expected = echo("uno" if case == "edited" else "one", 1)  # the turn replaced: still 1
    again = await reanswer_of(user, room, bot, answer, by)
    assert again["content"]["m.new_content"]["body"] == expected
    await user.sync_once(0)
    # Answered again exactly once: one edit of the answer, no new message, nothing else
    # naming the edit or the 🔁.
    assert [e["event_id"] for e in edits_of(user, room, bot, answer["event_id"], mark)] == [
        again["event_id"]
    ]
    assert bot_messages(user, room, bot, mark) == []
    assert [e["event_id"] for e in naming(user, room, bot, steered, mark)] == [again["event_id"]]
    caught_up(stack, log_mark, sent)
    fresh = await nothing_more_after_a_restart(user, stack, how, room, steered, 2)
    await user.sync_once(0)
    assert [e["event_id"] for e in bot_messages(user, room, bot, mark)] == [fresh["event_id"]]
    assert len(edits_of(user, room, bot, answer["event_id"], mark)) == 1


@pytest.mark.parametrize("how", STOPS)
@pytest.mark.parametrize("case", CASES)
async def test_steering_while_down_is_applied_once(
    stack: Deployment, new_user, case: str, how: str
) -> None:
    await steered_while_down(await new_user("sd"), stack, how, case)


# a stop in the middle of a re-answer


def latest_text(user: MatrixUser, room: str, first: Event) -> str:
    body = notice_text(first)
    for e in edits_of(user, room, first["sender"], first["event_id"]):
        body = e["content"]["m.new_content"]["body"]
    return body


def asked_text(request) -> str:
    return request.json["messages"][-1]["content"]


def history_sent(server: OpenAIServer, text: str) -> list[str]:
    """The user and assistant texts the agent was sent with the request for ``text``."""
    request = next(
        r for r in reversed(server.requests)
        if r.json and r.json["messages"][-1]["content"] == text
    )  # fmt: skip
    return [m["content"] for m in request.json["messages"] if m["role"] != "system"]


@pytest.mark.parametrize("how", STOPS)
@pytest.mark.parametrize("steering", ["edited", "regenerated"])
async def test_a_stop_mid_reanswer_finishes_it_once(
    stack: Deployment, new_user, slow: OpenAIServer, steering: str, how: str  # noqa: F811
) -> None:
    user = await new_user("mr")
    room, bot = (await onboard(user, stack)).room, stack.bot_id
    assert "slow" in notice_text(await user.command(room, "!agent slow", bot))
    first = await user.send_text(room, "one")
    answer = await answer_to(user, room, bot, first, in_progress=True)
    await user.wait_until(
        lambda: latest_text(user, room, answer) == "reply to: one", ANSWER_TIMEOUT, "answer one"
    )
    await user.sync_once(0)
    mark = user.mark()
    asked_before = len(slow.requests)
    if steering == "edited":
        by, text = await user.send(room, edit_of(first, "uno")), "uno"
    else:
        by, text = await user.send(room, reaction(answer["event_id"], "🔁"), "m.reaction"), "one"
    # The re-answer streams into the answer in place: stopped once it has started.
    await user.wait_for_event(
        room,
        lambda e: e["sender"] == bot and e["content"].get(ANSWERING) == by,
        mark,
        ANSWER_TIMEOUT,
    )
    log_mark = await down_and_up(stack, how)
    again = await reanswer_of(user, room, bot, answer, by)
    caught_up(stack, log_mark, [by])  # unfinished in the ledger: finished by the start
    # Asked twice: the stream the stop cut off, and once more after the start.
    assert [asked_text(r) for r in slow.requests[asked_before:]] == [text, text]
    assert again["content"]["m.new_content"]["body"] == f"reply to: {text}"
    await user.sync_once(0)
    assert latest_text(user, room, answer) == f"reply to: {text}"
    assert bot_messages(user, room, bot, mark) == []  # in place: no new message
    finals = [e for e in naming(user, room, bot, {by}, mark) if e["content"].get(ANSWERS)]
    assert [e["event_id"] for e in finals] == [again["event_id"]]
    assert all(
        e["content"]["m.relates_to"]["event_id"] == answer["event_id"]
        for e in naming(user, room, bot, {by}, mark)
    )

    # Restarted again: nothing more; the turn was replaced once (the history the agent is
    # sent for a fresh message holds the re-answered turn only).
    log_mark = await down_and_up(stack, how)
    assert f"Catching up {by} " not in stack.maubot.log_text()[log_mark:]
    fresh_id = await user.send_text(room, "two")
    fresh = await answer_to(user, room, bot, fresh_id, in_progress=True)
    await user.wait_until(
        lambda: latest_text(user, room, fresh) == "reply to: two", ANSWER_TIMEOUT, "answer two"
    )
    assert history_sent(slow, "two") == [text, f"reply to: {text}", "two"]
    await user.sync_once(0)
    assert [e["event_id"] for e in bot_messages(user, room, bot, mark)] == [fresh["event_id"]]
    finals = [e for e in naming(user, room, bot, {by}, mark) if e["content"].get(ANSWERS)]
    assert [e["event_id"] for e in finals] == [again["event_id"]]


# encrypted rooms (after the plain ones: the module's ``encrypted`` fixture turns new chat
# rooms encrypted until the module ends)


@pytest.mark.parametrize("how", STOPS)
@pytest.mark.parametrize("case", CASES)
async def test_steering_while_down_is_applied_once_encrypted(
    encrypted, e2e_user, case: str, how: str  # noqa: F811  (the fixtures imported above)
) -> None:  # fmt: skip
    need_crypto(encrypted.stack)
    await steered_while_down(await e2e_user("se"), encrypted.stack, how, case)
