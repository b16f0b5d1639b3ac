"""The plugin installs from its .mbp, runs in a real maubot and answers on a real Synapse."""

from __future__ import annotations

import pytest

from devstack.stack import Deployment

pytestmark = pytest.mark.real


async def test_invite_then_help(stack: Deployment, new_user) -> None:
    alice = await new_user("alice")
    room = await alice.dm(stack.bot_id)
    await alice.wait_for_event(
        room,
        lambda e: (
            e["type"] == "m.room.member"
            and e["state_key"] == stack.bot_id
            and e["content"]["membership"] == "join"
        ),
    )
    reply = await alice.command(room, "!help", stack.bot_id)
    assert reply["content"]["msgtype"] == "m.notice"
    body = reply["content"]["body"]
    for usage in ("!new", "!chats", "!rename", "!clear", "!context", "!agent"):
        assert usage in body
    assert "<code>" in reply["content"]["formatted_body"]


async def test_plugin_database_engine(stack: Deployment) -> None:
    instance = await stack.maubot.get_instance(stack.instance_id)
    assert instance["database_engine"] == stack.engine
    assert instance["started"] is True
