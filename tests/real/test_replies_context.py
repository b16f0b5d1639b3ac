"""Replies as context: a reply to an earlier event gives the agent that event's text."""

from __future__ import annotations

import pytest

from devstack.stack import Deployment

from .helpers import answer_to, notice_text, onboard

pytestmark = pytest.mark.real


def reply_to(event: dict, text: str) -> dict:
    """A reply as Element sends it: the quoted fallback, then the text."""
    quoted = event["content"]["body"].split("\n")[0]
    return {
        "msgtype": "m.text",
        "body": f"> <{event['sender']}> {quoted}\n\n{text}",
        "m.relates_to": {"m.in_reply_to": {"event_id": event["event_id"]}},
    }


async def test_a_reply_gives_the_agent_the_text_it_replies_to(stack: Deployment, new_user) -> None:
    kim = await new_user("kim")
    got = await onboard(kim, stack)
    bot = stack.bot_id
    first = await kim.send_text(got.room, "the plan: " + "x" * 3000)
    answer = await answer_to(kim, got.room, bot, first)
    reply = await kim.send(got.room, reply_to(answer, "and why?"))
    echoed = notice_text(await answer_to(kim, got.room, bot, reply))
    # echo answers with what it got: the quote (bounded, 2000 characters), then the text.
    assert echoed.startswith("echo: > echo: the plan: xxx")
    assert "…\n\nand why?" in echoed and f"<{bot}>" not in echoed
    assert len(echoed) < 2200
    # A reply to one of the user's own messages quotes that.
    own = {"event_id": first, "sender": kim.user_id, "content": {"body": "the plan"}}
    second = await kim.send(got.room, reply_to(own, "still?"))
    assert "echo: > the plan: xxx" in notice_text(await answer_to(kim, got.room, bot, second))
