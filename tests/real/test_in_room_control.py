"""Steering from the room, on the real stack (plain and encrypted rooms, both engines): an
edit of the latest message is answered again in place, the last turn replaced; a 🔁 on the
latest answer the same; an edit of an older message gets one notice."""

from __future__ import annotations

import pytest

from devstack.stack import Deployment
from lambda_plugin.intake import ANSWERS

from .helpers import ask, notice_text, onboard
from .test_encryption import e2e_user, encrypted, need_crypto  # noqa: F401  (fixtures)

pytestmark = pytest.mark.real


def edit_of(event_id: str, text: str) -> dict:
    """An edit as Element sends it."""
    return {
        "msgtype": "m.text", "body": f"* {text}",
        "m.new_content": {"msgtype": "m.text", "body": text},
        "m.relates_to": {"rel_type": "m.replace", "event_id": event_id},
    }  # fmt: skip


def reaction(event_id: str, key: str) -> dict:
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}}


async def edited_answer(user, room: str, bot: str, answer: dict, by: str) -> str:
    """The text of the bot's edit of ``answer`` that names ``by`` as what it answers."""
    found = await user.wait_for_event(
        room,
        lambda e: e["sender"] == bot and e["content"].get(ANSWERS) == by,
        timeout=90,
    )
    relates = found["content"]["m.relates_to"]
    assert (relates["rel_type"], relates["event_id"]) == ("m.replace", answer["event_id"])
    return found["content"]["m.new_content"]["body"]


async def steer(user, stack: Deployment, sealed: bool) -> None:
    got = await onboard(user, stack, encrypted=sealed)
    bot = stack.bot_id
    first, answer = await ask(user, got.room, "one", bot)
    assert notice_text(answer) == "echo: one\n\n(message 1 in this conversation)"
    edit = await user.send(got.room, edit_of(first, "uno"))
    # The same answer, edited in place; the turn replaced (still message 1).
    assert await edited_answer(user, got.room, bot, answer, edit) == (
        "echo: uno\n\n(message 1 in this conversation)"
    )
    again = await user.send(got.room, reaction(answer["event_id"], "🔁"), "m.reaction")
    assert await edited_answer(user, got.room, bot, answer, again) == (
        "echo: uno\n\n(message 1 in this conversation)"
    )
    _, second = await ask(user, got.room, "two", bot)
    assert notice_text(second).endswith("(message 2 in this conversation)")  # one turn before
    context = await user.command(got.room, "!context", bot)
    assert "messages: 4" in notice_text(context)  # uno and its answer, two and its answer
    older = await user.send(got.room, edit_of(first, "eins"))
    notice = await user.wait_for_event(
        got.room, lambda e: e["sender"] == bot and e["content"].get(ANSWERS) == older
    )
    assert "latest message" in notice_text(notice)


async def test_an_edit_and_a_regenerate_answer_again_in_place(stack: Deployment, new_user) -> None:
    await steer(await new_user("ed"), stack, sealed=False)


async def test_an_edit_and_a_regenerate_answer_again_in_place_encrypted(
    encrypted, e2e_user  # noqa: F811  (the fixtures imported above)
) -> None:
    need_crypto(encrypted.stack)
    await steer(await e2e_user("ee"), encrypted.stack, sealed=True)
