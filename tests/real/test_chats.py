"""!new, !chats, !rename, !archive, !unarchive end to end, with bad input; !save and !load
in a busy room, and !load's agent."""

from __future__ import annotations

import pytest
import pytest_asyncio

from devstack.stack import Deployment
from tests.servers.openai_server import OpenAIServer

from .helpers import ANSWER_TIMEOUT, completed, is_room_invite, join_chat, notice_text, onboard

pytestmark = pytest.mark.real
MARKER = "ai.lambda.matrix.room"


async def test_new_and_chats(stack: Deployment, new_user) -> None:
    erin = await new_user("erin")
    got = await onboard(erin, stack)
    bot = stack.bot_id

    reply = notice_text(await erin.command(got.room, "!new   Research   notes ", bot))
    assert "Research notes" in reply and "https://matrix.to/#/!" in reply
    new_room = reply.split("https://matrix.to/#/")[1].split("?")[0]
    assert new_room in erin.invites or await erin.wait_for_invite(lambda r, s: r == new_room)
    await join_chat(erin, new_room, bot)
    child = await erin.state_event(got.space, "m.space.child", new_room)
    first_child = await erin.state_event(got.space, "m.space.child", got.room)
    assert child["content"]["via"] == ["localhost"]
    assert first_child["content"]["order"] < child["content"]["order"]
    marker = (await erin.state_event(new_room, MARKER))["content"]
    first = (await erin.state_event(got.room, MARKER))["content"]
    assert marker["chat_id"] == "C2"
    assert marker["platform_chat_id"] != first["platform_chat_id"]

    # Default name, from the DM (the invite room) too.
    reply = notice_text(await erin.command(got.dm, "!new", bot))
    assert "Chat 3" in reply

    listing = notice_text(await erin.command(new_room, "!chats", bot))
    lines = [line for line in listing.splitlines() if "(C" in line]
    assert [line.split("(")[1][:2] for line in lines] == ["C1", "C2", "C3"]
    assert "Research notes" in lines[1] and "← this room" in lines[1]
    assert "agent `echo`" in lines[0]

    too_long = notice_text(await erin.command(got.room, "!new " + "x" * 101, bot))
    assert "too long" in too_long
    usage = notice_text(await erin.command(got.room, "!chats everything", bot))
    assert "!chats archived" in usage


async def test_rename_archive_unarchive(stack: Deployment, new_user) -> None:
    fay = await new_user("fay")
    got = await onboard(fay, stack)
    bot = stack.bot_id

    assert "give a name" in notice_text(await fay.command(got.room, "!rename    ", bot))
    assert "too long" in notice_text(await fay.command(got.room, "!rename " + "y" * 150, bot))
    assert "Plans" in notice_text(await fay.command(got.room, "!rename Plans", bot))
    name = await fay.state_event(got.room, "m.room.name")
    assert name["content"]["name"] == "Plans" and name["sender"] == bot
    # Chat commands need a chat room.
    assert "chat rooms" in notice_text(await fay.command(got.dm, "!rename X", bot))
    assert "chat rooms" in notice_text(await fay.command(got.dm, "!archive", bot))

    # A rename done in the client is picked up.
    await fay.send_state(got.room, "m.room.name", {"name": "Renamed in Element"})
    await fay.wait_for_event(got.room, lambda e: e["type"] == "m.room.name")
    listing = await fay.wait_until_reply_contains(got.dm, "!chats", bot, "Renamed in Element")
    assert "Renamed in Element" in listing

    assert "Archived" in notice_text(await fay.command(got.room, "!archive", bot))
    child = await fay.state_event(got.space, "m.space.child", got.room)
    assert child["content"] == {}
    assert (await fay.state_event(got.room, MARKER))["content"]["archived"] is True
    assert "already archived" in notice_text(await fay.command(got.room, "!archive", bot))
    assert "no chats" in notice_text(await fay.command(got.dm, "!chats", bot))
    archived = notice_text(await fay.command(got.dm, "!chats archived", bot))
    assert "Renamed in Element" in archived

    # The room and its history stay; the bot is still in it.
    assert "Back in your Space" in notice_text(await fay.command(got.room, "!unarchive", bot))
    child = await fay.state_event(got.space, "m.space.child", got.room)
    assert child["content"]["via"] == ["localhost"]
    assert (await fay.state_event(got.room, MARKER))["content"]["archived"] is False
    assert "not archived" in notice_text(await fay.command(got.room, "!unarchive", bot))


async def test_other_members_cannot_manage_a_room(stack: Deployment, new_user) -> None:
    gil = await new_user("gil")
    got = await onboard(gil, stack)
    guest = await new_user("guest")
    await gil.invite(got.room, guest.user_id)
    await guest.join(got.room)
    reply = notice_text(await guest.command(got.room, "!rename Hijacked", stack.bot_id))
    assert "chat rooms" in reply
    name = await gil.state_event(got.room, "m.room.name")
    assert name["content"]["name"] == "Chat 1"


async def test_chat_limit(stack: Deployment, new_user) -> None:
    await stack.configure({"access": {"max_chats_per_user": 2}})
    try:
        hal = await new_user("hal")
        got = await onboard(hal, stack)
        assert "Chat 2" in notice_text(await hal.command(got.room, "!new", stack.bot_id))
        reply = notice_text(await hal.command(got.room, "!new", stack.bot_id))
        assert "the most allowed" in reply
        await hal.sync_once(0)
        assert len([r for r, s in hal.invites.items() if is_room_invite(r, s)]) == 1
    finally:
        await stack.configure({"access": {"max_chats_per_user": 50}})


@pytest_asyncio.fixture(scope="module")
async def slow_agent(stack: Deployment):
    """An OpenAI-compatible server as the agent ``held``: a test makes it hold its answers."""
    server = OpenAIServer()
    url = await server.start()
    await stack.configure(
        {"agents": {"registry": {"held": {"backend": "openai", "base_url": url, "model": "m", "timeout_s": 90}}}}
    )
    yield server
    await server.stop()


async def answer(user, room: str, bot: str, body: str) -> str:
    """Sends ``body`` and returns the bot's complete answer (a streamed one once finished)."""
    await user.sync_once(0)
    mark = user.mark()
    await user.send_text(room, body)
    first = await user.wait_for_event(
        room,
        lambda e: e["sender"] == bot and e["type"] == "m.room.message"
        and e["content"].get("m.relates_to", {}).get("rel_type") != "m.replace",
        mark, ANSWER_TIMEOUT,
    )  # fmt: skip
    return await completed(user, room, first, mark, ANSWER_TIMEOUT)


def bot_notice(bot: str, *words: str):
    return lambda e: (
        e["sender"] == bot and e["type"] == "m.room.message"
        and all(word in e["content"].get("body", "") for word in words)
    )  # fmt: skip


async def test_save_then_load_in_a_busy_room_run_in_turn(
    stack: Deployment, new_user, slow_agent: OpenAIServer
) -> None:
    ida = await new_user("ida")
    got = await onboard(ida, stack)
    bot = stack.bot_id
    assert "held" in notice_text(await ida.command(got.room, "!agent held", bot))
    slow_agent.mode = "stall"
    slow_agent.release.clear()
    try:
        await ida.sync_once(0)
        mark = ida.mark()
        seen = len(slow_agent.requests)
        await ida.send_text(got.room, "a question that takes a while")
        await slow_agent.wait_requests(seen + 1)  # the room is busy answering it
        await ida.send_text(got.room, "!save busy")
        await ida.send_text(got.room, "!load busy")
    finally:
        slow_agent.mode = "ok"
        slow_agent.release.set()
    loaded = await ida.wait_for_event(
        got.room, bot_notice(bot, "continues from snapshot **busy**"), mark, ANSWER_TIMEOUT
    )
    assert "with the agent `held`" in loaded["content"]["body"]
    said = [e["content"].get("body", "") for e in ida.events_since(got.room, mark) if e["sender"] == bot]
    assert not any("no snapshot" in body.lower() for body in said), said
    assert any("Saved this conversation as snapshot **busy**" in body for body in said), said


async def test_load_continues_with_the_agent_of_the_snapshot(
    stack: Deployment, new_user, slow_agent: OpenAIServer
) -> None:
    jo = await new_user("jo")
    got = await onboard(jo, stack)
    bot = stack.bot_id
    assert "held" in notice_text(await jo.command(got.room, "!agent held", bot))
    assert "reply to: remember this" in await answer(jo, got.room, bot, "remember this")
    assert "Saved" in notice_text(await jo.command(got.room, "!save with-held", bot))

    reply = notice_text(await jo.command(got.room, "!new Echoing", bot))
    echo_room = reply.split("https://matrix.to/#/")[1].split("?")[0]
    await jo.join(echo_room)
    await jo.wait_for_event(echo_room, bot_notice(bot, "Welcome to **Echoing**"))  # said first
    assert "agent: `echo`" in notice_text(await jo.command(echo_room, "!context", bot))
    loaded = notice_text(await jo.command(echo_room, "!load with-held", bot))
    assert "with the agent `held`" in loaded
    assert "agent: `held`" in notice_text(await jo.command(echo_room, "!context", bot))
    marker = (await jo.state_event(echo_room, MARKER))["content"]
    assert marker["agent_id"] == "held"
    # The room now talks to the snapshot's agent, which gets the saved conversation.
    seen = len(slow_agent.requests)
    assert "reply to: and now?" in await answer(jo, echo_room, bot, "and now?")
    sent = [m["content"] for m in slow_agent.requests[seen].json["messages"]]
    assert sent[0] == "remember this" and sent[-1] == "and now?"
