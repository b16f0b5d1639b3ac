"""What several real-level tests do as a user: onboarding, reading room state."""

from __future__ import annotations

from dataclasses import dataclass

from devstack.matrix import Event, MatrixUser, invite_state_value
from devstack.stack import Deployment
from lambda_plugin.intake import ABOUT, ANSWERING, ANSWERS

ANSWER_TIMEOUT = 120


def is_space_invite(_room_id: str, state: list[Event]) -> bool:
    return invite_state_value(state, "m.room.create", "type") == "m.space"


def is_room_invite(_room_id: str, state: list[Event]) -> bool:
    return invite_state_value(state, "m.room.create", "type") != "m.space"


def bot_joined(bot_id: str):
    return lambda e: (
        e["type"] == "m.room.member"
        and e["state_key"] == bot_id
        and e["content"].get("membership") == "join"
    )


@dataclass
class Onboarded:
    dm: str
    space: str
    room: str


async def onboard(user: MatrixUser, stack: Deployment, encrypted: bool = False) -> Onboarded:
    """Invites the bot in a DM and accepts the Space and first chat room it sends."""
    dm = await user.dm(stack.bot_id, encrypted=encrypted)
    space = await user.wait_for_invite(is_space_invite)
    room = await user.wait_for_invite(is_room_invite)
    await user.join(space)
    await user.join(room)
    # The welcome notice comes last; waiting for it keeps it from passing for a later answer.
    await user.wait_for_event(
        room, lambda e: e["sender"] == stack.bot_id and "!help" in e["content"].get("body", "")
    )
    return Onboarded(dm, space, room)


async def join_chat(user: MatrixUser, room: str, bot: str) -> Event:
    """Joins a chat room the bot made and returns its welcome: said on the owner's join, it
    comes before anything the test asks there."""
    await user.join(room)
    return await user.wait_for_event(
        room, lambda e: e["sender"] == bot and "ai.lambda.matrix.welcome" in e["content"]
    )


def notice_text(event: Event) -> str:
    assert event["content"]["msgtype"] == "m.notice", event
    return event["content"]["body"]


async def completed(
    user: MatrixUser, room: str, first: Event, mark=None, timeout: float = 60
) -> str:
    """The complete text of the answer ``first``: a streamed one is edited (the edits after
    ``mark``) until it no longer ends with the cursor."""

    def latest() -> str | None:
        body = notice_text(first)
        for e in user.events_since(room, mark):
            relates = e["content"].get("m.relates_to", {})
            if (
                relates.get("rel_type") == "m.replace"
                and relates.get("event_id") == first["event_id"]
            ):
                body = e["content"]["m.new_content"]["body"]
        return None if body.endswith(" …") else body

    return await user.wait_until(latest, timeout, "a complete answer")


def bot_messages(user: MatrixUser, room: str, bot: str, mark=None) -> list[Event]:
    """The bot's messages after ``mark`` as the client reads them, edits left out."""
    return [
        e
        for e in user.events_since(room, mark)
        if e["type"] == "m.room.message"
        and e["sender"] == bot
        and (e["content"].get("m.relates_to") or {}).get("rel_type") != "m.replace"
    ]


def answers_to(
    user: MatrixUser, room: str, bot: str, event_id: str, mark=None, in_progress: bool = False
) -> list[Event]:
    """The bot's messages that say they answer ``event_id``; with ``in_progress``, also what
    it sent while working on it (a streamed answer's first event, until its final edit) or
    about it (why it was kept, a voice message's transcript)."""
    fields = (ANSWERS, ANSWERING, ABOUT) if in_progress else (ANSWERS,)
    return [
        e for e in bot_messages(user, room, bot, mark)
        if event_id in (e["content"].get(field) for field in fields)
    ]  # fmt: skip


async def answer_to(
    user: MatrixUser, room: str, bot: str, event_id: str, timeout: float = ANSWER_TIMEOUT,
    in_progress: bool = False,
) -> Event:  # fmt: skip
    """Waits for the bot's answer to ``event_id`` and returns it."""
    return await user.wait_until(
        lambda: next(iter(answers_to(user, room, bot, event_id, in_progress=in_progress)), None),
        timeout,
        f"the answer to {event_id} in {room}",
    )


async def ask(
    user: MatrixUser, room: str, text: str, bot: str, in_progress: bool = False
) -> tuple[str, Event]:
    """Sends ``text``; returns its event id and the bot's answer to it."""
    event_id = await user.send_text(room, text)
    return event_id, await answer_to(user, room, bot, event_id, in_progress=in_progress)
