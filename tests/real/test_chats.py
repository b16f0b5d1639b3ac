"""!new, !chats, !rename, !archive, !unarchive end to end, with bad input."""

from __future__ import annotations

import pytest

from devstack.stack import Deployment

from .helpers import is_room_invite, notice_text, onboard

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
    await erin.join(new_room)
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
