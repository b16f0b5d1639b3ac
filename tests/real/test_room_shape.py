"""What a client shows of the rooms the bot makes: closed to guests (and closed again by a
start), a topic kept current, the version, rooms linked by name, !help by role, the Space
answering with the chats."""

from __future__ import annotations

import pytest

from devstack.stack import Deployment

from .helpers import notice_text, onboard
from .test_reconcile import bot_device, report_value, restart

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


def links(room_id: str) -> tuple[str, str]:
    """A room's matrix.to URL as the plain body has it, and as the HTML's href (the "!"
    percent-encoded, as CommonMark normalises it; clients decode it)."""
    url = f"https://matrix.to/#/{room_id}?via=localhost"
    return url, url.replace("!", "%21")


async def test_new_and_chats_link_rooms_by_name(stack: Deployment, new_user) -> None:
    noa = await new_user("noa")
    got = await onboard(noa, stack)
    name = "Notes *v2* [draft] <b>"
    made = await noa.command(got.room, f"!new {name}", stack.bot_id)
    room = notice_text(made).split("/#/")[1].split("?")[0]
    url, href = links(room)
    anchor = f'<a href="{href}">Notes *v2* [draft] &lt;b&gt;</a>'
    assert anchor in made["content"]["formatted_body"], made["content"]
    assert f"{name} <{url}>" in notice_text(made)
    listing = await noa.command(got.room, "!chats", stack.bot_id)
    html, body = listing["content"]["formatted_body"], notice_text(listing)
    first_url, first_href = links(got.room)
    assert anchor in html and f'<a href="{first_href}">Chat 1</a>' in html, html
    assert html.count("<a ") == 2 and "<b>" not in html and "<em>" not in html
    assert f"Chat 1 <{first_url}> (C1)" in body and f"{name} <{url}> (C2)" in body, body


async def test_help_shows_admin_commands_to_admins_only(stack: Deployment, new_user) -> None:
    kai = await new_user("kai")
    got = await onboard(kai, stack)
    said = notice_text(await kai.command(got.room, "!help", stack.bot_id))
    assert "!new" in said and "!agent" in said
    for admin_only in ("!lambda", "operator", "config"):
        assert admin_only not in said, said
    await stack.configure({"access": {"admins": [kai.user_id]}})
    try:
        said = notice_text(await kai.command(got.room, "!help", stack.bot_id))
        assert "!new" in said and "!lambda status" in said, said
    finally:
        await stack.configure({"access": {"admins": []}})


async def test_the_topic_follows_the_agent(stack: Deployment, new_user) -> None:
    await stack.configure({"agents": {"registry": {"shape_echo": {"backend": "echo"}}}})
    lia = await new_user("lia")
    got = await onboard(lia, stack)
    said = notice_text(await lia.command(got.room, "!agent shape_echo", stack.bot_id))
    assert "now talks to `shape_echo`" in said
    topic = await lia.state_event(got.room, "m.room.topic")
    assert topic is not None and topic["content"]["topic"] == "shape_echo · !help"


async def test_the_space_answers_its_owner_with_the_chats(stack: Deployment, new_user) -> None:
    ola = await new_user("ola")
    got = await onboard(ola, stack)
    answer = await ola.command(got.space, "hello?", stack.bot_id)
    first_url, first_href = links(got.room)
    assert f'<a href="{first_href}">Chat 1</a>' in answer["content"]["formatted_body"]
    assert f"Chat 1 <{first_url}>" in notice_text(answer)
    assert got.space not in notice_text(answer)  # never a link to the Space itself


async def test_a_start_closes_managed_rooms_open_to_guests(stack: Deployment, new_user) -> None:
    """Rooms made before they were made closed: the private_chat preset opened them to
    guests. The owner (power 50) can't change that; the bot's own account opens them here,
    as the older version did."""
    uma = await new_user("uma")
    got = await onboard(uma, stack)
    bot = await bot_device(stack)
    for room_id in (got.space, got.room):
        await bot.send_state(room_id, "m.room.guest_access", {"guest_access": "can_join"})
    line = await restart(stack)
    assert int(report_value(line, "repaired_guest_access")) >= 2, line
    for room_id in (got.space, got.room):
        guests = await uma.state_event(room_id, "m.room.guest_access")
        assert guests is not None and guests["content"] == {"guest_access": "forbidden"}
