"""The database is a cache: wiped, it is rebuilt from the rooms at start, exactly."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from devstack.matrix import MatrixUser
from devstack.proxy import FaultProxy
from devstack.stack import Deployment
from lambda_plugin.marker import KIND_CHAT, KIND_SPACE, MARKER_TYPE, Marker
from lambda_plugin.matrix import SLIDING_SYNC

from .helpers import ask, is_room_invite, is_space_invite, join_chat, notice_text, onboard

pytestmark = pytest.mark.real
ROWS = "SELECT room_id, user_id, chat_id, name, agent_id, platform_chat_id, archived, gone FROM chat_room"


async def restart(stack: Deployment) -> str:
    """Restarts the instance and returns the log line of the reconciliation that read every
    room: the start's, or, after a start that read only the changed rooms (a delta), the
    verification that follows it in the background."""
    mark = stack.log_mark()
    await stack.restart_instance()
    line = stack.wait_for_log("Reconciled: ", after=mark)
    if report_value(line, "delta") == "True":
        return stack.wait_for_log("Verified every room: ", after=mark)
    return line


def report_value(line: str, key: str) -> str:
    return (
        line.split(f" {key}=")[1].split()[0]
        if f" {key}=" in line
        else line.split(f"{key}=")[1].split()[0]
    )


async def bot_device(stack: Deployment) -> MatrixUser:
    """The bot's own account on a second device: what the plugin itself could have done."""
    login = stack.synapse.login(stack.bot_id, "bot-password")
    user = MatrixUser(stack.synapse.url, stack.bot_id, login["access_token"])
    stack.users.append(user)
    return user


async def space_made_by_the_bot(bot: MatrixUser, owner: str) -> str:
    """A user's Space exactly as the plugin creates it, but made behind the plugin's back."""
    return await bot.create_room(
        name=f"Lambda — {owner}",
        preset="private_chat",
        creation_content={"type": "m.space"},
        invite=[owner],
        initial_state=[Marker(kind=KIND_SPACE, owner=owner).state_event()],
    )


def normalise(rows: list[dict]) -> list[dict]:
    return sorted(
        ({**r, "archived": bool(r["archived"]), "gone": bool(r["gone"])} for r in rows),
        key=lambda r: r["room_id"],
    )


async def test_wiped_database_is_rebuilt(stack: Deployment, new_user) -> None:
    ida = await new_user("ida")
    got = await onboard(ida, stack)
    bot = stack.bot_id
    reply = notice_text(await ida.command(got.room, "!new Research", bot))
    research = reply.split("https://matrix.to/#/")[1].split("?")[0]
    await join_chat(ida, research, bot)
    assert "Archived" in notice_text(await ida.command(research, "!archive", bot))
    await ida.send_state(got.room, "m.room.name", {"name": "Renamed by hand"})
    await ida.wait_until_reply_contains(got.dm, "!chats", bot, "Renamed by hand")
    before = normalise(await stack.sql(f"{ROWS} WHERE user_id='{ida.user_id}'"))
    assert len(before) == 2
    user_before = await stack.sql(
        f"SELECT space_id, next_chat_index FROM lambda_user WHERE user_id='{ida.user_id}'"
    )

    await stack.sql("DELETE FROM chat_room")
    await stack.sql("DELETE FROM lambda_user")
    line = await restart(stack)
    assert int(report_value(line, "restored_chat_rows")) >= 2
    assert report_value(line, "conflicts") == "0"

    after = normalise(await stack.sql(f"{ROWS} WHERE user_id='{ida.user_id}'"))
    assert after == before
    user_after = await stack.sql(
        f"SELECT space_id, next_chat_index FROM lambda_user WHERE user_id='{ida.user_id}'"
    )
    assert user_after == user_before
    listing = notice_text(await ida.command(got.room, "!chats archived", bot))
    assert "Research" in listing
    # Nothing new was created: still one Space and the two rooms.
    await ida.sync_once(0)
    assert len([r for r, s in ida.invites.items() if is_space_invite(r, s)]) == 0

    # A second start on a consistent database writes nothing.
    line = await restart(stack)
    assert report_value(line, "writes") == "0", line


async def wiped_and_restarted(stack: Deployment) -> str:
    await stack.sql("DELETE FROM chat_room")
    await stack.sql("DELETE FROM lambda_user")
    return await restart(stack)


async def test_rooms_read_in_batches_or_one_by_one_rebuild_the_same(
    stack: Deployment, new_user
) -> None:
    ivy = await new_user("ivy")
    got = await onboard(ivy, stack)
    await ivy.command(got.room, "!new Second", stack.bot_id)
    mine = f"{ROWS} WHERE user_id='{ivy.user_id}'"
    before = normalise(await stack.sql(mine))
    assert len(before) == 2

    # By default the rooms are read through sliding sync, many rooms a request.
    line = await wiped_and_restarted(stack)
    joined, requests = int(report_value(line, "joined_rooms")), int(report_value(line, "requests"))
    assert joined >= 4 and requests < joined, line
    assert normalise(await stack.sql(mine)) == before

    await stack.configure({"reconcile": {"read_batch": 0}})  # one /state per room
    try:
        line = await wiped_and_restarted(stack)
        assert int(report_value(line, "requests")) > int(report_value(line, "joined_rooms"))
        assert normalise(await stack.sql(mine)) == before
    finally:
        await stack.configure({"reconcile": {"read_batch": 200}})


async def test_half_made_space_is_completed_not_duplicated(stack: Deployment, new_user) -> None:
    jo = await new_user("jo")
    bot = await bot_device(stack)
    # The plugin died right after creating the Space: no database row, no chat room.
    space = await space_made_by_the_bot(bot, jo.user_id)
    await restart(stack)
    await jo.dm(stack.bot_id)
    room = await jo.wait_for_invite(is_room_invite)
    await join_chat(jo, room, stack.bot_id)
    marker = await jo.state_event(room, MARKER_TYPE)
    assert marker["content"]["space_id"] == space
    assert [r for r, s in jo.invites.items() if is_space_invite(r, s)] == [space]


async def test_unmarked_child_rooms_are_adopted(stack: Deployment, new_user) -> None:
    kim = await new_user("kim")
    bot = await bot_device(stack)
    space = await space_made_by_the_bot(bot, kim.user_id)
    # A room an older version made: in the Space, but without the plugin's marker.
    old = await bot.create_room(name="Old chat", preset="private_chat", invite=[kim.user_id])
    await bot.send_state(space, "m.space.child", {"via": ["localhost"]}, old)
    line = await restart(stack)
    assert int(report_value(line, "restored_room_meta")) >= 1
    marker = await bot.state_event(old, MARKER_TYPE)
    assert marker["sender"] == stack.bot_id
    assert marker["content"]["kind"] == KIND_CHAT
    assert marker["content"]["chat_id"] == "C1"
    first_id = marker["content"]["platform_chat_id"]
    parent = await bot.state_event(old, "m.space.parent", space)
    assert parent["content"]["via"] == ["localhost"]
    # Deterministic: wiped and adopted again, the room keeps its id; then nothing to write.
    await stack.sql(f"DELETE FROM chat_room WHERE user_id='{kim.user_id}'")
    await restart(stack)
    rows = await stack.sql(f"SELECT platform_chat_id FROM chat_room WHERE room_id='{old}'")
    assert rows == [{"platform_chat_id": first_id}]
    line = await restart(stack)
    assert report_value(line, "writes") == "0", line


async def test_markers_not_sent_by_the_bot_are_ignored(stack: Deployment, new_user) -> None:
    mal = await new_user("mal")
    got = await onboard(mal, stack)
    # Mallory makes her own room, forges the plugin's marker in it, and invites the bot.
    forged = Marker(
        kind=KIND_CHAT, owner=mal.user_id, space_id=got.space, chat_id="C7",
        agent_id="echo", platform_chat_id="stolen-id",
    )  # fmt: skip
    own = await mal.create_room(name="Forged", initial_state=[forged.state_event()])
    await mal.invite(own, stack.bot_id)
    await restart(stack)
    rows = await stack.sql(f"SELECT room_id FROM chat_room WHERE user_id='{mal.user_id}'")
    assert [r["room_id"] for r in rows] == [got.room]
    assert "Forged" not in notice_text(await mal.command(got.room, "!chats", stack.bot_id))


async def test_messages_sent_while_down_are_answered_once(stack: Deployment, new_user) -> None:
    rae = await new_user("rae")
    got = await onboard(rae, stack)
    bot = stack.bot_id
    await rae.sync_once(0)
    mark = rae.mark()

    sent: list[str] = []

    async def write_while_down() -> None:
        sent.append(await rae.send_text(got.room, "!chats"))
        sent.append(await rae.send_text(got.room, "sent while you were away"))

    log_mark = stack.log_mark()
    await stack.restart_server(write_while_down)
    assert len(sent) == 2
    # maubot drops the first sync after a start: only the plugin's catch-up answers these.
    answers = await rae.wait_until(
        lambda: (
            [e for e in rae.events_since(got.room, mark) if e["sender"] == bot][:2] or None
            if len([e for e in rae.events_since(got.room, mark) if e["sender"] == bot]) >= 2
            else None
        ),
        what="two answers",
    )
    # Commands and messages are answered independently: either order is right.
    bodies = sorted(notice_text(e) for e in answers)
    assert "(C1)" in bodies[0] and "echo: sent while you were away" in bodies[1]
    del log_mark  # maubot may or may not have dropped them; caught up or live, each once

    # Started again, nothing is answered twice.
    log_mark = stack.log_mark()
    await stack.restart_instance()
    stack.wait_for_log("Caught up 0 message", after=log_mark)
    await rae.sync_once(0)
    assert len([e for e in rae.events_since(got.room, mark) if e["sender"] == bot]) == 2


async def test_admin_commands(stack: Deployment, new_user) -> None:
    sam = await new_user("sam")
    got = await onboard(sam, stack)
    bot = stack.bot_id
    assert "for the bot's admins" in notice_text(await sam.command(got.room, "!lambda status", bot))
    await stack.configure({"access": {"admins": [sam.user_id]}})
    try:
        status = notice_text(await sam.command(got.room, "!lambda status", bot))
        assert "users:" in status and "`echo`: healthy" in status and "joined_rooms:" in status
        dry = notice_text(await sam.command(got.room, "!lambda reconcile --dry-run", bot))
        assert "dry run" in dry and "dry_run: True" in dry
        ask = notice_text(await sam.command(got.room, "!lambda reset local", bot))
        assert "--confirm" in ask
        assert await stack.sql(f"SELECT chat_id FROM chat_room WHERE room_id='{got.room}'")
        done = notice_text(await sam.command(got.room, "!lambda reset local --confirm", bot))
        assert "Local reset done" in done and "restored_chat_rows:" in done
        rows = await stack.sql(f"SELECT chat_id FROM chat_room WHERE room_id='{got.room}'")
        assert rows == [{"chat_id": "C1"}]
        assert "(C1)" in notice_text(await sam.command(got.room, "!chats", bot))
        usage = notice_text(await sam.command(got.room, "!lambda reset everything", bot))
        assert "Usage" in usage
    finally:
        await stack.configure({"access": {"admins": []}})


_proxied = itertools.count(1)


@pytest_asyncio.fixture
async def proxied(stack: Deployment) -> AsyncIterator[tuple[Deployment, FaultProxy]]:
    """A bot of its own in the stack's maubot (so on the stack's engine), whose client talks
    to Synapse through a FaultProxy: what maubot's client reads can be made to fail."""
    proxy = FaultProxy(stack.synapse.url)
    await proxy.start()
    n = next(_proxied)
    localpart, instance_id = f"lambda_px{n}_{os.getpid()}_{stack.engine}", f"lambda_px{n}"
    bot_id = stack.synapse.register(localpart, "bot-password")
    login = stack.synapse.login(bot_id, "bot-password")
    client = {
        "homeserver": proxy.url, "access_token": login["access_token"],
        "device_id": login["device_id"], "autojoin": False, "sync": True, "enabled": True,
        "online": True, "displayname": "Lambda", "avatar_url": "disable",
    }  # fmt: skip
    maubot = stack.maubot
    try:
        await maubot.api("PUT", f"/client/{bot_id}", json=client)
        await maubot.crypto_status(bot_id)  # waits until the client has started
        await maubot.create_instance(instance_id, bot_id, {"spaces": {"encryption": "never"}})
        yield Deployment(maubot, stack.synapse, stack.engine, bot_id, instance_id), proxy
    finally:
        # Gone again, so no later test reads this instance's log lines for the stack's.
        for path in (f"/instance/{instance_id}", f"/client/{bot_id}"):
            try:
                await maubot.api("DELETE", path)
            except Exception as e:  # the other clean-up still runs
                print(f"clean-up of {path} failed: {e}")
        await proxy.stop()


async def test_a_room_unreadable_at_start_stays_answered_and_is_read_again(
    proxied: tuple[Deployment, FaultProxy], new_user
) -> None:
    px, proxy = proxied
    ada = await new_user("ada")
    got = await onboard(ada, px)
    bot, logged = px.bot_id, f"@maubot.instance.{px.instance_id}] "
    # A start that reads every room (a restart with the database intact reads only what
    # changed, and every room later, in the background).
    await px.configure({"access": {"admins": [ada.user_id]}, "reconcile": {"delta_start": False}})
    assert "echo: before" in notice_text((await ask(ada, got.room, "before", bot))[1])

    # maubot's reads of the room's state fail: its own /state, and the batch it is in.
    room_state = proxy.fail(rf"/rooms/{re.escape(got.room)}/state$", 500, method="GET")
    batches = proxy.fail(re.escape(SLIDING_SYNC) + "$", 500)
    mark = px.log_mark()
    await px.restart_instance()
    line = px.wait_for_log(logged + "Reconciled: ", after=mark)
    assert room_state.hits >= 1 and batches.hits >= 1
    assert report_value(line, "unreadable_rooms") == got.room, line
    assert report_value(line, "gone_rooms") == "0", line
    rows = await px.sql(f"SELECT gone FROM chat_room WHERE room_id='{got.room}'")
    assert [bool(r["gone"]) for r in rows] == [False]

    # Its chat is still answered (not pointed to the Space), and the report lists it.
    assert "echo: while unreadable" in notice_text(
        (await ask(ada, got.room, "while unreadable", bot))[1]
    )
    status = notice_text(await ada.command(got.room, "!lambda status", bot))
    assert f"unreadable_rooms: {got.room}" in status, status

    # Read again in the background: failing while the faults last, then settled.
    await ada.wait_until(lambda: room_state.hits >= 2, 120, "a failed re-read")
    proxy.clear()
    px.wait_for_log(logged + f"Read {got.room} again", after=mark, timeout=180)
    status = notice_text(await ada.command(got.room, "!lambda status", bot))
    assert "unreadable_rooms: none" in status, status
    assert "echo: after" in notice_text((await ask(ada, got.room, "after", bot))[1])
