"""What a client shows of the rooms the bot makes: closed to guests, a topic, the version."""

from __future__ import annotations

import pytest

from devstack.stack import Deployment

from .helpers import notice_text, onboard

pytestmark = pytest.mark.real


async def test_rooms_are_closed_to_guests_and_have_a_topic(stack: Deployment, new_user) -> None:
    ada = await new_user("ada")
    got = await onboard(ada, stack)
    for room_id in (got.space, got.room):
        guests = await ada.state_event(room_id, "m.room.guest_access")
        assert guests is not None and guests["content"] == {"guest_access": "forbidden"}
    chat_topic = await ada.state_event(got.room, "m.room.topic")
    assert chat_topic is not None and chat_topic["content"]["topic"] == "echo · !help"
    space_topic = await ada.state_event(got.space, "m.room.topic")
    assert space_topic is not None and space_topic["content"]["topic"]


async def test_the_configured_room_version_is_used(stack: Deployment, new_user) -> None:
    eve = await new_user("eve")
    got = await onboard(eve, stack)
    await stack.configure({"spaces": {"room_version": "10"}})
    try:
        made = notice_text(await eve.command(got.room, "!new Old", stack.bot_id))
        room = made.split("/#/")[1].split("?")[0]
        await eve.join(room)
        create = await eve.state_event(room, "m.room.create")
        assert create is not None and create["content"]["room_version"] == "10"
        # The bot still holds the room: on v10 its power is in the power levels.
        levels = await eve.state_event(room, "m.room.power_levels")
        assert levels is not None and levels["content"]["users"][stack.bot_id] == 100
    finally:
        await stack.configure({"spaces": {"room_version": None}})


async def test_a_new_chat_room_greets_its_owner_when_they_join(
    stack: Deployment, new_user
) -> None:
    """The welcome goes when the owner's join is seen, so it is in their sync (a user of
    another homeserver sees only what follows their join); `!new` rooms get one too, once."""
    ivy = await new_user("ivy")
    got = await onboard(ivy, stack)
    made = notice_text(await ivy.command(got.room, "!new Plans", stack.bot_id))
    room = made.split("/#/")[1].split("?")[0]
    await ivy.join(room)
    welcome = await ivy.wait_for_reply(room, stack.bot_id)
    assert "Plans" in notice_text(welcome) and "!help" in notice_text(welcome)
    assert welcome["content"]["ai.lambda.matrix.welcome"]
    answered = await ivy.command(room, "hello", stack.bot_id)
    assert "echo: hello" in notice_text(answered)
    said = [
        e["event_id"] for e in ivy.events_since(room)
        if e["sender"] == stack.bot_id and e["type"] == "m.room.message"
    ]  # fmt: skip
    assert said == [welcome["event_id"], answered["event_id"]]
