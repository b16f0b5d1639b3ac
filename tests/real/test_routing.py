"""Per-room routing to agents over a real Synapse + maubot, with local agent servers."""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest
import pytest_asyncio

from devstack.stack import Deployment
from lambda_plugin.intake import ABOUT, ANSWERING
from tests.servers.lambda_server import LambdaServer
from tests.servers.openai_server import OpenAIServer

from .helpers import completed, join_chat, notice_text, onboard

pytestmark = pytest.mark.real
PCID = re.compile(r"platform_chat_id: `?([\w-]+)`?")


def is_answer(bot: str):
    """A final answer or a notice from the bot, not an edit of an earlier one."""
    return lambda e: (
        e["type"] == "m.room.message"
        and e["sender"] == bot
        and e["content"].get("m.relates_to", {}).get("rel_type") != "m.replace"
    )


async def final_answer(user, room: str, bot: str, mark, timeout: float = 60) -> str:
    """The bot's first answer after ``mark`` once complete: streamed answers are edited
    until they no longer end with the cursor."""
    first = await user.wait_for_event(room, is_answer(bot), mark, timeout)
    return await completed(user, room, first, mark, timeout)


async def say(user, room: str, body: str, bot: str, timeout: float = 60) -> str:
    await user.sync_once(0)
    mark = user.mark()
    await user.send_text(room, body)
    return await final_answer(user, room, bot, mark, timeout)


@pytest_asyncio.fixture(scope="module")
async def agents(stack: Deployment):
    """An OpenAI-compatible and a Lambda platform server, registered as agents."""
    openai, platform = OpenAIServer(), LambdaServer(token="platform-secret")
    openai_url = await openai.start()
    platform_url = await platform.start()
    await stack.configure(
        {
            "agents": {
                "registry": {
                    "gpt": {
                        "backend": "openai",
                        "base_url": openai_url,
                        "model": "test-model",
                        "api_key": "sk-test-secret",
                        "timeout_s": 3,
                    },
                    "platform": {
                        "backend": "lambda",
                        "base_url": platform_url,
                        "token": "platform-secret",
                        "timeout_s": 3,
                    },
                }
            },
            "replies": {"stream_edit_interval_s": 0.3},
        }
    )
    yield openai, platform
    await openai.stop()
    await platform.stop()


async def test_rooms_keep_separate_conversations(stack: Deployment, new_user) -> None:
    lea = await new_user("lea")
    got = await onboard(lea, stack)
    bot = stack.bot_id
    second = notice_text(await lea.command(got.room, "!new", bot)).split("/#/")[1].split("?")[0]
    await join_chat(lea, second, bot)

    answer = await say(lea, got.room, "hello **world**", bot)
    assert "echo: hello **world**" in answer and "message 1 " in answer
    assert "message 2 " in await say(lea, got.room, "again", bot)
    assert "message 1 " in await say(lea, second, "other room", bot)

    before = PCID.search(notice_text(await lea.command(got.room, "!context", bot))).group(1)
    other = PCID.search(notice_text(await lea.command(second, "!context", bot))).group(1)
    assert before != other
    cleared = notice_text(await lea.command(got.room, "!clear", bot))
    after = PCID.search(cleared).group(1)
    assert after not in (before, other)
    assert "message 1 " in await say(lea, got.room, "fresh start", bot)
    assert "message 2 " in await say(lea, second, "still here", bot)
    context = notice_text(await lea.command(second, "!context", bot))
    assert PCID.search(context).group(1) == other and "messages: 4" in context
    marker = await lea.state_event(got.room, "ai.lambda.matrix.room")
    assert marker["content"]["platform_chat_id"] == after

    # !save in one room, !load in the other: the conversation continues there.
    assert "Saved" in notice_text(await lea.command(second, "!save two-msgs", bot))
    loaded = notice_text(await lea.command(got.room, "!load two-msgs", bot))
    assert "two-msgs" in loaded and PCID.search(loaded).group(1) not in (after, other)
    assert "message 3 " in await say(lea, got.room, "continued", bot)
    assert "message 3 " in await say(lea, second, "the snapshot stays", bot)
    assert "two-msgs" in notice_text(await lea.command(got.room, "!context", bot))
    assert "no snapshot" in notice_text(await lea.command(got.room, "!load nope", bot)).lower()

    # A new room forked from the snapshot.
    forked = notice_text(await lea.command(got.dm, "!new Fork --from two-msgs", bot))
    fork_room = forked.split("/#/")[1].split("?")[0]
    await join_chat(lea, fork_room, bot)
    assert "message 3 " in await say(lea, fork_room, "forked", bot)


async def test_order_under_burst_while_another_room_stalls(stack, agents, new_user) -> None:
    openai, _ = agents
    max_ = await new_user("max")
    got = await onboard(max_, stack)
    bot = stack.bot_id
    slow = notice_text(await max_.command(got.room, "!new Slow", bot)).split("/#/")[1].split("?")[0]
    await join_chat(max_, slow, bot)
    assert "gpt" in notice_text(await max_.command(slow, "!agent gpt", bot))
    openai.mode = "stall"
    openai.release.clear()
    seen = len(openai.requests)
    await max_.sync_once(0)
    stalled_mark = max_.mark()
    await max_.send_text(slow, "this one stalls")
    await openai.wait_requests(seen + 1)

    await max_.sync_once(0)
    mark = max_.mark()
    await asyncio.gather(*(max_.send_text(got.room, f"burst {i}") for i in range(20)))
    # Sent at once, but each send returned in turn: the server's order is the timeline's.
    await max_.wait_until(
        lambda: len([e for e in max_.events_since(got.room, mark) if is_answer(bot)(e)]) >= 20,
        what="20 answers",
    )
    sent = [
        e["content"]["body"]
        for e in max_.events_since(got.room, mark)
        if e["sender"] == max_.user_id and e["type"] == "m.room.message"
    ]
    answers = [
        e["content"]["body"].split("\n")[0].removeprefix("echo: ")
        for e in max_.events_since(got.room, mark)
        if is_answer(bot)(e)
    ]
    assert answers == sent
    openai.mode = "ok"
    openai.release.set()
    assert "reply to: this one stalls" in await final_answer(max_, slow, bot, stalled_mark)


async def test_streaming_shows_throttled_edits(stack, agents, new_user) -> None:
    openai, _ = agents
    ned = await new_user("ned")
    got = await onboard(ned, stack)
    bot = stack.bot_id
    await ned.command(got.room, "!agent gpt", bot)
    openai.mode, openai.chunks, openai.chunk_delay_s = "stream", 8, 0.15
    openai.reply_text = " ".join(f"word{i}" for i in range(40))
    try:
        first = notice_text(await ned.command(got.room, "please stream", bot))
        assert first.endswith(" …")
        final = await ned.wait_for_event(
            got.room,
            lambda e: e["content"].get("m.new_content", {}).get("body") == openai.reply_text,
        )
        edits = [
            e
            for e in ned.events_since(got.room)
            if e["content"].get("m.relates_to", {}).get("rel_type") == "m.replace"
        ]
        assert len(edits) >= 2 and edits[-1] is final
        times = [e["origin_server_ts"] for e in edits[:-1]]
        # Interim edits no closer than the interval (the final one comes when the answer is done).
        assert all(b - a >= 250 for a, b in itertools.pairwise(times)), times
    finally:
        openai.mode, openai.reply_text, openai.chunk_delay_s = "ok", None, 0.0


@pytest.mark.parametrize("mode", ["fail", "garbage", "empty", "stall", "down"])
async def test_failures_are_clear_and_retry_works(stack, agents, new_user, mode: str) -> None:
    openai, _ = agents
    ola = await new_user("ola")
    got = await onboard(ola, stack)
    bot = stack.bot_id
    await ola.command(got.room, "!agent gpt", bot)
    if mode == "down":
        await stack.configure(
            {"agents": {"registry": {"gpt": {"base_url": "http://127.0.0.1:9/v1"}}}}
        )
    else:
        openai.mode = mode
        openai.release.clear()
    try:
        error = await say(ola, got.room, "will this work?", bot)
    finally:
        openai.mode = "ok"
        openai.release.set()
        if mode == "down":
            await stack.configure({"agents": {"registry": {"gpt": {"base_url": openai.base_url}}}})
    expected = {
        "fail": "error (HTTP 500)",
        "garbage": "could not be read",
        "empty": "empty answer",
        "stall": "took too long",
        "down": "unreachable",
    }[mode]
    assert expected in error and "!retry" in error
    assert "sk-test-secret" not in error and "127.0.0.1" not in error
    await ola.sync_once(0)
    mark = ola.mark()
    await ola.send_text(got.room, "!retry")
    await ola.wait_for_event(got.room, lambda e: "Retrying" in e["content"].get("body", ""), mark)
    mark = ola.mark()
    assert "reply to: will this work?" in await final_answer(ola, got.room, bot, mark)
    assert "sk-test-secret" not in stack.maubot.log_text()


async def test_lambda_platform_agent(stack, agents, new_user) -> None:
    _, platform = agents
    pia = await new_user("pia")
    got = await onboard(pia, stack)
    bot = stack.bot_id
    await pia.command(got.room, "!agent platform", bot)
    answer = await say(pia, got.room, "hi platform", bot)
    assert "hi platform" in answer
    pcid = PCID.search(notice_text(await pia.command(got.room, "!context", bot))).group(1)
    assert pcid in platform.chats
    await pia.command(got.room, "!clear", bot)
    assert any(r.method == "DELETE" and pcid in r.path for r in platform.requests)
    assert "platform-secret" not in stack.maubot.log_text()


async def test_long_answer_arrives_whole(stack, agents, new_user) -> None:
    openai, _ = agents
    quinn = await new_user("quinn")
    got = await onboard(quinn, stack)
    bot = stack.bot_id
    await quinn.command(got.room, "!agent gpt", bot)
    paragraph = "All work and no play makes a long answer. " * 24
    openai.reply_text = "\n\n".join(f"{i}: {paragraph}" for i in range(100))  # ~100 KB
    try:
        await quinn.sync_once(0)
        mark = quinn.mark()
        await quinn.send_text(got.room, "tell me everything")
        await quinn.wait_until(
            lambda: (
                "99: "
                in "".join(
                    e["content"]["body"]
                    for e in quinn.events_since(got.room, mark)
                    if is_answer(bot)(e)
                )
            ),
            what="the whole answer",
        )
        parts = [
            e["content"]["body"] for e in quinn.events_since(got.room, mark) if is_answer(bot)(e)
        ]
        assert len(parts) >= 8
        assert "".join(parts).split() == openai.reply_text.split()
    finally:
        openai.reply_text = None


async def test_unmanaged_rooms_get_a_pointer_and_shared_rooms_answer_guests(
    stack: Deployment, new_user
) -> None:
    rex = await new_user("rex")
    got = await onboard(rex, stack)
    bot = stack.bot_id
    pointer = await say(rex, got.dm, "hello?", bot)
    assert "not one of your chats" in pointer and got.space in pointer
    # At most once a while: a second message in the same room gets no second pointer.
    await rex.sync_once(0)
    mark = rex.mark()
    await rex.send_text(got.dm, "still there?")
    await say(rex, got.room, "ping", bot)  # an answer elsewhere proves the bot went on
    await rex.sync_once(0)
    assert not [e for e in rex.events_since(got.dm, mark) if e["sender"] == bot]

    guest = await new_user("guest")
    await rex.invite(got.room, guest.user_id)
    await guest.join(got.room)
    await guest.sync_once(0)
    mark = guest.mark()
    await guest.send_text(got.room, "may I?")
    # The next answer in the room is to the owner's ping: the guest's message got none.
    assert "echo: ping" in await say(rex, got.room, "ping", bot)
    assert not [
        e
        for e in guest.events_since(got.room, mark)
        if "may I?" in e["content"].get("body", "") and e["sender"] == bot
    ]
    await stack.configure({"access": {"shared_rooms": True}})
    try:
        assert "echo: may I now?" in await say(guest, got.room, "may I now?", bot)
    finally:
        await stack.configure({"access": {"shared_rooms": False}})


async def test_another_members_flood_takes_no_place_of_the_owners(
    stack, agents, new_user
) -> None:
    """With shared_rooms off, a member who floods the room while the owner's answer runs
    takes none of the room's places and hears nothing: the owner's next message is answered."""
    openai, _ = agents
    ora = await new_user("ora")
    got = await onboard(ora, stack)
    bot = stack.bot_id
    # gpt's 3 s deadline could end the stalled answer before the flood is in.
    patient = {"backend": "openai", "base_url": openai.base_url, "model": "test-model"}
    await stack.configure(
        {"agents": {"registry": {"patient": patient}}, "access": {"max_queue_per_room": 2}}
    )
    try:
        assert "patient" in notice_text(await ora.command(got.room, "!agent patient", bot))
        flooder = await new_user("flooder")
        await ora.invite(got.room, flooder.user_id)
        await flooder.join(got.room)
        openai.mode = "stall"
        openai.release.clear()
        seen = len(openai.requests)
        await ora.sync_once(0)
        mark = ora.mark()
        await ora.send_text(got.room, "the owner asks")
        await openai.wait_requests(seen + 1)
        for i in range(6):
            await flooder.send_text(got.room, f"flood {i}")
            await flooder.send_text(got.room, f"!nosuch{i}")
        await ora.send_text(got.room, "and asks again")
        await ora.wait_until(
            lambda: any(
                e["content"].get("body") == "and asks again" for e in ora.events_since(got.room, mark)
            ),
            what="the owner's second message in the timeline",
        )
        openai.mode = "ok"
        openai.release.set()
        await ora.wait_until(
            lambda: len([e for e in ora.events_since(got.room, mark) if is_answer(bot)(e)]) >= 2
            or None,
            what="two answers",
        )
        answers = [e for e in ora.events_since(got.room, mark) if is_answer(bot)(e)]
        texts = [await completed(ora, got.room, e, mark) for e in answers]
        assert "reply to: the owner asks" in texts[0]
        assert "reply to: and asks again" in texts[1]
        # Nothing was said to the flooder: no answer, no "queue full", no unknown command.
        assert len(answers) == 2, [notice_text(e) for e in answers]
    finally:
        openai.mode = "ok"
        openai.release.set()
        await stack.configure({"access": {"max_queue_per_room": 20}})


async def test_a_stop_reaction_stops_a_stream_within_5_s(stack, agents, new_user) -> None:
    """🛑 on the answer that streams (its first event) stops it as !cancel does; another
    member's 🛑 changes nothing."""
    openai, _ = agents
    pia = await new_user("pia")
    got = await onboard(pia, stack)
    bot = stack.bot_id
    patient = {"backend": "openai", "base_url": openai.base_url, "model": "test-model"}
    await stack.configure({"agents": {"registry": {"patient": patient}}})
    assert "patient" in notice_text(await pia.command(got.room, "!agent patient", bot))
    guest = await new_user("guest")
    await pia.invite(got.room, guest.user_id)
    await guest.join(got.room)
    openai.mode, openai.chunk_delay_s = "endless", 0.05
    try:
        await pia.sync_once(0)
        mark = pia.mark()
        question = await pia.send_text(got.room, "go on forever")
        first = await pia.wait_for_event(
            got.room, lambda e: e["sender"] == bot and e["content"].get(ANSWERING) == question, mark
        )
        stop = {"m.relates_to": {"rel_type": "m.annotation", "event_id": first["event_id"], "key": "🛑"}}
        await guest.send(got.room, stop, "m.reaction")
        await pia.sync_once(0)
        after_guest = pia.mark()
        # The stream goes on after the guest's 🛑: another edit of it comes.
        await pia.wait_for_event(
            got.room,
            lambda e: e["sender"] == bot
            and (e["content"].get("m.relates_to") or {}).get("event_id") == first["event_id"],
            after_guest,
        )
        await pia.send(got.room, stop, "m.reaction")
        stopped = await pia.wait_for_event(
            got.room, lambda e: e["sender"] == bot and e["content"].get(ABOUT) == question, mark, 5
        )
        assert "!retry" in notice_text(stopped)
    finally:
        openai.mode, openai.chunk_delay_s = "ok", 0.0
