"""What several real-level tests do as a user: onboarding, reading room state."""

from __future__ import annotations

from dataclasses import dataclass

from devstack.matrix import Event, MatrixUser, invite_state_value
from devstack.stack import Deployment


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


def notice_text(event: Event) -> str:
    assert event["content"]["msgtype"] == "m.notice", event
    return event["content"]["body"]
