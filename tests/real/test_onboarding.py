"""Invite → private Space with a first chat room, exactly once; access policy; left users."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest

from devstack.matrix import MatrixError
from devstack.stack import Deployment
from lambda_plugin.texts import TEXTS

from .helpers import bot_joined, is_room_invite, is_space_invite, notice_text, onboard

pytestmark = pytest.mark.real
MARKER = "ai.lambda.matrix.room"


async def test_invite_gives_space_and_first_room(stack: Deployment, new_user) -> None:
    alice = await new_user("alice")
    got = await onboard(alice, stack, encrypted=True)  # Element encrypts new DMs

    create = await alice.state_event(got.space, "m.room.create")
    assert create["content"]["type"] == "m.space"
    space_name = await alice.state_event(got.space, "m.room.name")
    assert space_name["content"]["name"].startswith("Lambda — ")
    room_name = await alice.state_event(got.room, "m.room.name")
    assert room_name["content"]["name"] == "Chat 1"

    child = await alice.state_event(got.space, "m.space.child", got.room)
    assert child["content"]["via"] == ["localhost"] and child["content"]["order"]
    parent = await alice.state_event(got.room, "m.space.parent", got.space)
    assert parent["content"] == {"via": ["localhost"], "canonical": True}

    for room_id, kind in ((got.space, "space"), (got.room, "chat")):
        marker = await alice.state_event(room_id, MARKER)
        assert marker["sender"] == stack.bot_id
        assert marker["content"]["kind"] == kind
        assert marker["content"]["owner"] == alice.user_id
        power = (await alice.state_event(room_id, "m.room.power_levels"))["content"]
        assert power["users"][alice.user_id] == 50
        assert power["events"][MARKER] == 100
        for event_type in ("m.space.child", "m.space.parent", "m.room.power_levels"):
            assert power["events"][event_type] > 50
        with pytest.raises(MatrixError) as refused:
            await alice.send_state(room_id, MARKER, {"kind": "chat", "owner": alice.user_id})
        assert refused.value.status == 403
    chat_marker = (await alice.state_event(got.room, MARKER))["content"]
    assert chat_marker["chat_id"] == "C1"
    assert chat_marker["space_id"] == got.space
    assert chat_marker["agent_id"] == "echo"
    assert chat_marker["platform_chat_id"]
    assert chat_marker["archived"] is False

    # The user may talk and rename; the welcome notice is waiting in the chat room.
    await alice.send_state(got.room, "m.room.name", {"name": "Mine"})
    welcome = await alice.wait_for_reply(got.room, stack.bot_id)
    assert "!help" in notice_text(welcome)


async def test_duplicate_invites_give_one_space(stack: Deployment, new_user) -> None:
    bob = await new_user("bob")
    dms = await asyncio.gather(*(bob.dm(stack.bot_id) for _ in range(5)))
    for dm in dms:
        await bob.wait_for_event(dm, bot_joined(stack.bot_id))
    # Every DM after the first is told where the Space is: all five invites were handled.
    told = await bob.wait_until(
        lambda: (
            [
                dm
                for dm in dms
                if any(
                    e["type"] == "m.room.message"
                    and "already have your Space" in e["content"]["body"]
                    for e in bob.events_since(dm)
                )
            ]
            if sum(
                any(
                    e["type"] == "m.room.message" and e["sender"] == stack.bot_id
                    for e in bob.events_since(dm)
                )
                for dm in dms
            )
            >= 4
            else None
        ),
        what="four 'already have your Space' notices",
    )
    assert len(told) == 4
    await bob.wait_for_invite(is_room_invite)
    spaces = [r for r, s in bob.invites.items() if is_space_invite(r, s)]
    rooms = [r for r, s in bob.invites.items() if is_room_invite(r, s)]
    assert len(spaces) == 1, spaces
    assert len(rooms) == 1, rooms
    reply = await bob.command(dms[0], "!chats", stack.bot_id)
    assert notice_text(reply).count("(C") == 1


async def test_refused_user_gets_nothing(stack: Deployment, new_user) -> None:
    await stack.configure({"access": {"allowed_users": ["@someone_else:localhost"]}})
    try:
        carol = await new_user("carol")
        dm = await carol.dm(stack.bot_id)
        left = await carol.wait_for_event(
            dm,
            lambda e: (
                e["type"] == "m.room.member"
                and e["state_key"] == stack.bot_id
                and e["content"].get("membership") == "leave"
            ),
        )
        assert left["content"].get("reason") == "not allowed to use this bot"
        assert not [r for r, s in carol.invites.items() if is_space_invite(r, s)]
        # The server pattern admits her: the next invite works.
        await stack.configure({"access": {"allowed_users": ["@*:localhost"]}})
        await carol.invite(dm, stack.bot_id)
        await carol.wait_for_invite(is_space_invite)
    finally:
        await stack.configure({"access": {"allowed_users": ["*"]}})


async def test_user_who_left_is_invited_back(stack: Deployment, new_user) -> None:
    dave = await new_user("dave")
    got = await onboard(dave, stack)
    await dave.leave(got.space)
    await dave.leave(got.room)
    await dave.wait_until(lambda: got.space in dave.left and got.room in dave.left, what="left")
    dm2 = await dave.dm(stack.bot_id)
    await dave.wait_until(
        lambda: got.space in dave.invites and got.room in dave.invites, what="re-invites"
    )
    reply = await dave.wait_for_reply(dm2, stack.bot_id)
    assert got.space in notice_text(reply)


async def joined_members(user, room_id: str) -> set[str]:
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/joined_members"
    return set((await user.request("GET", path))["joined"])


def bot_left(bot_id: str):
    return lambda e: (
        e["type"] == "m.room.member"
        and e["state_key"] == bot_id
        and e["content"].get("membership") == "leave"
    )


async def test_rooms_joined_for_one_inviter_are_bounded(stack: Deployment, new_user) -> None:
    most, bot = 2, stack.bot_id
    await stack.configure({"access": {"max_joins_per_inviter": most}})
    try:
        erin = await new_user("erin")
        await onboard(erin, stack)  # the DM (and the Space, its chat): not counted
        *extra, over = [await erin.create_room(preset="private_chat") for _ in range(most + 1)]
        for room_id in extra:
            await erin.invite(room_id, bot)
            await erin.wait_for_event(room_id, bot_joined(bot))
        mark = stack.log_mark()
        await stack.restart_instance()  # the count is kept in the database
        stack.wait_for_log("Reconciled: ", after=mark)
        await erin.invite(over, bot)
        left = await erin.wait_for_event(over, bot_left(bot))
        assert left["content"].get("reason") == TEXTS["en"]["invite.too_many"].format(max=most)
        assert bot not in await joined_members(erin, over)
        for room_id in extra:  # the earlier ones stay joined
            assert bot in await joined_members(erin, room_id)
        # Removed from one of them, the bot takes an invite into another room again.
        mark = stack.log_mark()
        kick = f"/_matrix/client/v3/rooms/{quote(extra[0])}/kick"
        await erin.request("POST", kick, {"user_id": bot, "reason": "done"})
        stack.wait_for_log(f"Removed from {extra[0]} by {erin.user_id}", after=mark)
        await erin.invite(over, bot)
        await erin.wait_for_event(over, bot_joined(bot))
    finally:
        await stack.configure({"access": {"max_joins_per_inviter": 20}})
