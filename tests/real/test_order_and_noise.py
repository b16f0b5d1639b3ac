"""Order after a start, malformed events, and noise: what the room shows after the plugin
was stopped, restarted, or lost its database, and what it must leave unanswered."""

from __future__ import annotations

import re

import pytest

from devstack.matrix import Event, MatrixError, MatrixUser
from devstack.stack import Deployment
from lambda_plugin.intake import ANSWERS
from lambda_plugin.quotes import with_quote

from .helpers import (
    ANSWER_TIMEOUT,
    answer_to,
    answers_to,
    ask,
    bot_messages,
    join_chat,
    notice_text,
    onboard,
)

pytestmark = pytest.mark.real
PCID = re.compile(r"platform_chat_id: `?([\w-]+)`?")
# Catch-up after a start waits for reconciliation; maubot's first sync may long-poll 30 s.
PLUGIN_TABLES = (
    "history", "snapshot", "ledger", "plugin_state", "chat_room", "lambda_user", "usage"
)
LOG_RECORD = re.compile(r"(?m)^(?=\[\d{4}-\d\d-\d\d )")


def echo(text: str, number: int) -> str:
    """The echo agent's whole answer to ``text`` as message ``number`` of its conversation."""
    return f"echo: {text}\n\n(message {number} in this conversation)"


def position(user: MatrixUser, room: str, event: Event) -> int:
    ids = [e["event_id"] for e in user.timelines.get(room, [])]
    return ids.index(event["event_id"])


def room_link(notice: Event) -> str:
    return notice_text(notice).split("/#/")[1].split("?")[0]


async def stop_instance(stack: Deployment) -> None:
    """Stops the plugin instance (maubot and its client keep running and syncing)."""
    await stack.maubot.set_started(stack.instance_id, False)


async def start_instance(stack: Deployment) -> str:
    """Starts the instance; returns its start line (logged once the catch-up is queued)."""
    mark = stack.log_mark()
    await stack.maubot.set_started(stack.instance_id, True)
    return stack.wait_for_log("Reconciled: ", after=mark)


async def wipe_plugin_database(stack: Deployment) -> None:
    """Every row of every plugin table gone, as after a lost database. Done through maubot's
    database API, which needs the instance running: the caller restarts it right after."""
    for table in PLUGIN_TABLES:
        await stack.sql(f"DELETE FROM {table}")
    for table in PLUGIN_TABLES:
        assert await stack.sql(f"SELECT COUNT(*) AS n FROM {table}") in ([{"n": 0}], [{"n": "0"}])


def plugin_tracebacks(stack: Deployment, after: int) -> list[str]:
    """Log records after offset ``after`` that carry a traceback the plugin caused: logged by
    the instance's logger, or with the plugin's code in the stack."""
    records = LOG_RECORD.split(stack.maubot.log_text()[after:])
    own = f"@maubot.instance.{stack.instance_id}"
    return [
        r
        for r in records
        if "Traceback" in r and (own in r.split("\n", 1)[0] or "lambda_plugin" in r)
    ]


async def test_missed_clear_splits_the_conversation_in_order(stack: Deployment, new_user) -> None:
    """q1, !clear, q2 sent while the instance is stopped: q1 ends the old conversation, the
    clear comes next, q2 opens the new one, in that order in the room."""
    uma = await new_user("uma")
    got = await onboard(uma, stack)
    bot = stack.bot_id
    _, first = await ask(uma, got.room, "q0", bot)
    assert notice_text(first) == echo("q0", 1)
    old = PCID.search(notice_text(await uma.command(got.room, "!context", bot))).group(1)
    await uma.sync_once(0)
    mark = uma.mark()

    await stop_instance(stack)
    try:
        q1 = await uma.send_text(got.room, "q1")
        clear = await uma.send_text(got.room, "!clear")
        q2 = await uma.send_text(got.room, "q2")
    finally:
        await start_instance(stack)

    answer1 = await answer_to(uma, got.room, bot, q1)
    cleared = await answer_to(uma, got.room, bot, clear)
    answer2 = await answer_to(uma, got.room, bot, q2)
    assert notice_text(answer1) == echo("q1", 2)  # the old conversation, continued
    assert "Cleared" in notice_text(cleared)
    new = PCID.search(notice_text(cleared)).group(1)
    assert new != old
    assert notice_text(answer2) == echo("q2", 1)  # the first message of the new one
    order = [position(uma, got.room, e) for e in (answer1, cleared, answer2)]
    assert order == sorted(order), order

    context = notice_text(await uma.command(got.room, "!context", bot))
    assert PCID.search(context).group(1) == new and "messages: 2" in context
    # Each answered once, and nothing else said since the start.
    assert [e["content"].get(ANSWERS) for e in bot_messages(uma, got.room, bot, mark)][:3] == [
        q1,
        clear,
        q2,
    ]
    for event_id in (q1, clear, q2):
        assert len(answers_to(uma, got.room, bot, event_id)) == 1



async def test_replies_sent_while_stopped_are_read_as_the_client_shows_them(
    stack: Deployment, new_user
) -> None:
    """A reply carries a quote of the message it answers (the fallback). Caught up after a
    start, the reply is what it is live: `!clear` a command, a question without the quote."""
    una = await new_user("una")
    got = await onboard(una, stack)
    bot = stack.bot_id
    first = await una.send_text(got.room, "first")
    quoted = await answer_to(una, got.room, bot, first)
    mark = una.mark()

    def reply(text: str) -> dict:
        return {
            "msgtype": "m.text",
            "body": f"> <{bot}> {notice_text(quoted).splitlines()[0]}\n\n{text}",
            "format": "org.matrix.custom.html",
            "formatted_body": f"<mx-reply><blockquote>{first}</blockquote></mx-reply>{text}",
            "m.relates_to": {"m.in_reply_to": {"event_id": quoted["event_id"]}},
        }

    await stop_instance(stack)
    try:
        clear = await una.send(got.room, reply("!clear"))
        question = await una.send(got.room, reply("and now?"))
    finally:
        await start_instance(stack)

    assert "Cleared" in notice_text(await answer_to(una, got.room, bot, clear))
    # The agent got the text without the fallback, after the quoted answer it replies to
    # (access.max_quote_chars), as the first message of the conversation !clear began.
    expected = with_quote("and now?", notice_text(quoted))
    assert notice_text(await answer_to(una, got.room, bot, question)) == echo(expected, 1)
    assert len(bot_messages(una, got.room, bot, mark)) == 2

async def test_malformed_messages_sent_while_down_are_skipped(stack: Deployment, new_user) -> None:
    vic = await new_user("vic")
    got = await onboard(vic, stack)
    bot = stack.bot_id
    second = room_link(await vic.command(got.room, "!new", bot))
    await join_chat(vic, second, bot)
    await vic.sync_once(0)
    mark = vic.mark()
    log_mark = stack.log_mark()

    await stop_instance(stack)
    try:
        bad = [
            await vic.send(
                got.room, {"msgtype": "m.text", "body": "relates is null", "m.relates_to": None}
            ),
            await vic.send(
                got.room, {"msgtype": "m.text", "body": "relates is a list", "m.relates_to": []}
            ),
        ]
        # A body that is no string never gets into the room from a client: Synapse refuses it
        # (only federation could bring one; intake's unit tests cover that case).
        with pytest.raises(MatrixError) as refused:
            await vic.send(got.room, {"msgtype": "m.text", "body": 42})
        assert refused.value.status == 400 and "'body' not a string type" in str(refused.value)
        good_a = await vic.send_text(got.room, "normal in the first room")
        good_b = await vic.send_text(second, "normal in the second room")
    finally:
        await start_instance(stack)

    answer_a = await answer_to(vic, got.room, bot, good_a)
    answer_b = await answer_to(vic, second, bot, good_b)
    # Markers in both rooms: the room's queue answers in order, so once they are answered
    # anything the plugin would have said to the earlier events is in the timeline.
    marker_a, _ = await ask(vic, got.room, "marker one", bot)
    marker_b, _ = await ask(vic, second, "marker two", bot)
    assert plugin_tracebacks(stack, log_mark) == []
    said_a = bot_messages(vic, got.room, bot, mark)
    said_b = bot_messages(vic, second, bot, mark)
    assert [e["content"].get(ANSWERS) for e in said_a] == [good_a, marker_a], (
        bad,
        [(e["content"].get(ANSWERS), notice_text(e)) for e in said_a],
    )
    assert [e["content"].get(ANSWERS) for e in said_b] == [good_b, marker_b]
    # Nothing skipped reached the agent either: the normal message opens the conversation.
    assert notice_text(answer_a) == echo("normal in the first room", 1)
    assert notice_text(answer_b) == echo("normal in the second room", 1)


async def test_answers_mention_nobody(stack: Deployment, new_user) -> None:
    wyn = await new_user("wyn")
    got = await onboard(wyn, stack)
    bot = stack.bot_id
    text = f"tell @room and {wyn.user_id} hello"
    _, answer = await ask(wyn, got.room, text, bot)
    assert notice_text(answer) == echo(text, 1)
    assert answer["content"]["m.mentions"] == {}


async def test_unknown_commands_only_in_managed_rooms(stack: Deployment, new_user) -> None:
    yan = await new_user("yan")
    got = await onboard(yan, stack)
    bot = stack.bot_id
    await yan.sync_once(0)
    mark = yan.mark()
    # The DM is no chat room: an unknown command there is not the plugin's to answer.
    unknown = await yan.send_text(got.dm, "!nosuchcommand")
    # A plain message is answered in the DM's turn (the Space pointer), after the command's.
    await yan.send_text(got.dm, "marker")
    pointer = await yan.wait_for_event(
        got.dm, lambda e: e["sender"] == bot and e["type"] == "m.room.message", mark,
        ANSWER_TIMEOUT,
    )  # fmt: skip
    assert "not one of your chats" in notice_text(pointer)
    # Help answers anywhere: once it is there too, the DM has had its say on both.
    await answer_to(yan, got.dm, bot, await yan.send_text(got.dm, "!help"))
    said = bot_messages(yan, got.dm, bot, mark)
    assert len(said) == 2 and said[0] is pointer, [notice_text(e) for e in said]
    assert not answers_to(yan, got.dm, bot, unknown)

    # In a chat room it is told there is no such command.
    unknown = await yan.send_text(got.room, "!nosuchcommand")
    answer = await answer_to(yan, got.room, bot, unknown)
    assert notice_text(answer) == (
        "There is no command `!nosuchcommand`. `!help` lists the commands."
    )


async def test_unknown_command_of_another_member_gets_nothing(stack: Deployment, new_user) -> None:
    zoe = await new_user("zoe")
    got = await onboard(zoe, stack)
    bot = stack.bot_id
    guest = await new_user("guest")
    await zoe.invite(got.room, guest.user_id)
    await guest.join(got.room)
    await zoe.wait_for_event(
        got.room,
        lambda e: e["type"] == "m.room.member" and e["state_key"] == guest.user_id
        and e["content"].get("membership") == "join",
    )  # fmt: skip
    mark = zoe.mark()
    unknown = await guest.send_text(got.room, "!nosuchcommand")
    await zoe.wait_for_event(got.room, lambda e: e["event_id"] == unknown, mark)
    # The owner's next message is answered in the room's turn, after the guest's command.
    marker, answer = await ask(zoe, got.room, "marker after the guest", bot)
    assert notice_text(answer) == echo("marker after the guest", 1)
    said = bot_messages(zoe, got.room, bot, mark)
    assert [e["content"].get(ANSWERS) for e in said] == [marker], [notice_text(e) for e in said]


async def test_answered_once_after_the_database_is_lost(stack: Deployment, new_user) -> None:
    ava = await new_user("ava")
    got = await onboard(ava, stack)
    bot = stack.bot_id
    await ava.sync_once(0)
    mark = ava.mark()
    question = await ava.send_text(got.room, "what is 2+2?")
    answer = await ava.wait_for_reply(got.room, bot, mark, ANSWER_TIMEOUT)
    assert answer["content"][ANSWERS] == question
    assert notice_text(answer) == echo("what is 2+2?", 1)

    log_mark = stack.log_mark()
    await wipe_plugin_database(stack)
    await stop_instance(stack)
    await start_instance(stack)
    # A second start within the catch-up window, on what the first one rebuilt.
    await stop_instance(stack)
    await start_instance(stack)

    marker, marker_answer = await ask(ava, got.room, "marker", bot)
    # History went with the database: the marker starts the conversation again.
    assert notice_text(marker_answer) == echo("marker", 1)
    assert len(answers_to(ava, got.room, bot, question)) == 1
    assert [e["content"].get(ANSWERS) for e in bot_messages(ava, got.room, bot, mark)] == [
        question,
        marker,
    ]
    assert f"Catching up {question} " not in stack.maubot.log_text()[log_mark:]


async def test_first_message_after_a_process_restart(stack: Deployment, new_user) -> None:
    bea = await new_user("bea")
    got = await onboard(bea, stack)
    bot = stack.bot_id
    await bea.sync_once(0)
    mark = bea.mark()
    # Returns as soon as the management API of the new process answers.
    await stack.restart_server()
    hello = await bea.send_text(got.room, "hello after restart")
    # maubot's first sync (whose events it drops) may long-poll up to 30 s.
    answer = await answer_to(bea, got.room, bot, hello, timeout=90)
    assert notice_text(answer) == echo("hello after restart", 1)
    marker, _ = await ask(bea, got.room, "marker", bot)
    assert [e["content"].get(ANSWERS) for e in bot_messages(bea, got.room, bot, mark)] == [
        hello,
        marker,
    ]


async def test_a_message_behind_a_flood_of_edits_is_still_caught_up(
    stack: Deployment, new_user
) -> None:
    """More happened while the plugin was stopped than one read of the timeline holds (here
    60 edits after the question; in an encrypted room edits and reactions alike): the start
    pages back, and the question is answered."""
    ida = await new_user("ida")
    got = await onboard(ida, stack)
    bot = stack.bot_id
    draft = await ida.send_text(got.room, "a draft")
    await answer_to(ida, got.room, bot, draft)
    await stop_instance(stack)
    try:
        question = await ida.send_text(got.room, "the question behind the edits")
        for i in range(60):
            await ida.send(
                got.room,
                {
                    "msgtype": "m.text",
                    "body": f"* draft {i}",
                    "m.new_content": {"msgtype": "m.text", "body": f"draft {i}"},
                    "m.relates_to": {"rel_type": "m.replace", "event_id": draft},
                },
            )
    finally:
        await start_instance(stack)
    answer = await answer_to(ida, got.room, bot, question)
    assert notice_text(answer) == echo("the question behind the edits", 2)
