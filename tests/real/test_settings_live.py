"""Config saved in maubot takes effect live; a bad value is refused; Russian end to end."""

from __future__ import annotations

import pytest

from devstack.stack import Deployment

from .helpers import is_room_invite, notice_text, onboard

pytestmark = pytest.mark.real


async def test_invalid_config_is_refused_and_the_old_one_stays(stack: Deployment, new_user) -> None:
    zed = await new_user("zed")
    got = await onboard(zed, stack)
    mark = stack.log_mark()
    await stack.configure({"language": "xx", "spaces": {"chat_name": "Broken {nope}"}})
    try:
        line = stack.wait_for_log("Config refused", after=mark)
        assert "language" in line and "previous config stays in force" in line
        reply = notice_text(await zed.command(got.room, "!new", stack.bot_id))
        assert "Chat 2" in reply  # the previous (English, default) config still in force
    finally:
        await stack.configure({"language": "en", "spaces": {"chat_name": "Chat {n}"}})


async def test_russian_end_to_end(stack: Deployment, new_user) -> None:
    await stack.configure({"language": "ru"})
    try:
        ivan = await new_user("ivan")
        got = await onboard(ivan, stack)
        name = await ivan.state_event(got.room, "m.room.name")
        assert name["content"]["name"] == "Чат 1"
        help_text = notice_text(await ivan.command(got.room, "!help", stack.bot_id))
        assert "список команд" in help_text
        created = notice_text(await ivan.command(got.room, "!new", stack.bot_id))
        assert "Создан чат **Чат 2**" in created or "Чат 2" in created
        refused = notice_text(await ivan.command(got.dm, "!rename X", stack.bot_id))
        assert "работает в одном из ваших чатов" in refused
    finally:
        await stack.configure({"language": "en"})


async def test_room_the_bot_left_is_gone_and_not_recreated(stack: Deployment, new_user) -> None:
    from devstack.matrix import MatrixUser

    amy = await new_user("amy")
    got = await onboard(amy, stack)
    login = stack.synapse.login(stack.bot_id, "bot-password")
    bot = MatrixUser(stack.synapse.url, stack.bot_id, login["access_token"])
    stack.users.append(bot)
    await bot.leave(got.room)  # as a server admin's removal would, the bot is out of the room
    listing = await amy.wait_until_reply_contains(got.dm, "!chats", stack.bot_id, "no chats")
    assert "no chats" in listing
    rows = await stack.sql(f"SELECT gone FROM chat_room WHERE room_id='{got.room}'")
    assert [bool(r["gone"]) for r in rows] == [True]
    await stack.restart_instance()
    listing = notice_text(await amy.command(got.dm, "!chats", stack.bot_id))
    assert "no chats" in listing
    await amy.sync_once(0)
    assert [r for r, s in amy.invites.items() if is_room_invite(r, s)] == []
