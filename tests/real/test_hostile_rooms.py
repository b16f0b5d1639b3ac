"""Owners can't wipe the bot's state: the homeserver refuses it in the plugin's rooms, rooms
made before that are repaired at start, and a marker emptied before is written again."""

from __future__ import annotations

import time
from urllib.parse import quote

import pytest

from devstack.matrix import MatrixError, MatrixUser
from devstack.stack import Deployment
from lambda_plugin.marker import MARKER_TYPE
from lambda_plugin.roomstate import BOT_LEVEL, PROTECTED_EVENTS

from .helpers import onboard
from .test_reconcile import bot_device, report_value, restart, space_made_by_the_bot

pytestmark = pytest.mark.real
POWER = "m.room.power_levels"


async def redact(user: MatrixUser, room_id: str, event_id: str) -> str:
    txn = f"{time.time_ns()}"
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/redact/{quote(event_id)}/{txn}"
    return (await user.request("PUT", path, {"reason": "test"}))["event_id"]


async def test_owners_cannot_redact_the_bots_state(stack: Deployment, new_user) -> None:
    ora = await new_user("ora")
    got = await onboard(ora, stack)
    for room_id in (got.space, got.room):
        levels = (await ora.state_event(room_id, POWER))["content"]
        assert levels["redact"] == BOT_LEVEL
        marker = await ora.state_event(room_id, MARKER_TYPE)
        with pytest.raises(MatrixError) as refused:
            await redact(ora, room_id, marker["event_id"])
        assert (refused.value.status, refused.value.errcode) == (403, "M_FORBIDDEN")
        assert (await ora.state_event(room_id, MARKER_TYPE))["content"] == marker["content"]
    # Users still take back their own messages: that needs no power level.
    own = await ora.send_text(got.room, "a message to take back")
    assert await redact(ora, got.room, own)


async def test_old_rooms_get_their_power_levels_raised(stack: Deployment, new_user) -> None:
    pia = await new_user("pia")
    bot = await bot_device(stack)
    # A Space as an older version made it: Synapse's default levels, redact at 50.
    space = await space_made_by_the_bot(bot, pia.user_id)
    before = (await bot.state_event(space, POWER))["content"]
    assert before.get("redact", 50) < BOT_LEVEL

    line = await restart(stack)
    assert int(report_value(line, "repaired_power_levels")) >= 1, line
    after = (await bot.state_event(space, POWER))["content"]
    assert after["redact"] == BOT_LEVEL
    assert all(after["events"][t] >= BOT_LEVEL for t in PROTECTED_EVENTS), (before, after)
    assert after["users"] == before["users"]  # nobody's own level changed

    await pia.join(space)
    marker = await pia.state_event(space, MARKER_TYPE)
    with pytest.raises(MatrixError) as refused:
        await redact(pia, space, marker["event_id"])
    assert refused.value.status == 403
    # Repaired once: the next start finds nothing to raise.
    line = await restart(stack)
    assert report_value(line, "repaired_power_levels") == "0", line


async def test_an_emptied_marker_is_written_again_with_the_same_ids(
    stack: Deployment, new_user
) -> None:
    quinn = await new_user("quinn")
    got = await onboard(quinn, stack)
    bot = await bot_device(stack)
    kept = await stack.sql(
        f"SELECT chat_id, platform_chat_id FROM chat_room WHERE room_id='{got.room}'"
    )
    # What an owner could do before redaction moved up: the markers emptied.
    for room_id in (got.space, got.room):
        marker = await bot.state_event(room_id, MARKER_TYPE)
        await redact(bot, room_id, marker["event_id"])
        assert (await bot.state_event(room_id, MARKER_TYPE))["content"] == {}

    line = await restart(stack)
    assert int(report_value(line, "restored_room_meta")) >= 2, line
    chat = (await bot.state_event(got.room, MARKER_TYPE))["content"]
    assert (chat["chat_id"], chat["platform_chat_id"]) == (
        kept[0]["chat_id"],
        kept[0]["platform_chat_id"],
    )
    assert chat["space_id"] == got.space
    space = (await bot.state_event(got.space, MARKER_TYPE))["content"]
    assert (space["kind"], space["owner"]) == ("space", quinn.user_id)
    rows = await stack.sql(
        f"SELECT chat_id, platform_chat_id FROM chat_room WHERE user_id='{quinn.user_id}'"
    )
    assert rows == kept
    user = await stack.sql(f"SELECT space_id FROM lambda_user WHERE user_id='{quinn.user_id}'")
    assert user == [{"space_id": got.space}]
