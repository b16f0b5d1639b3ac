"""Many managed rooms, fast, exactly as the plugin makes them (not through its commands).

Each owner gets what onboarding gives and ``!new`` adds: a direct chat with the bot (made by
the user, joined by the bot), a private Space and chat rooms, with the plugin's own createRoom
bodies (marker in ``initial_state``, ``m.space.parent``, the plugin's power levels), then an
``m.space.child`` with ``via`` and ``order`` in the Space. The bot acts through a second
device of its own account, many requests at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from devstack.matrix import MatrixUser
from lambda_plugin.marker import KIND_CHAT, KIND_SPACE, Marker
from lambda_plugin.roomstate import (
    clean_name,
    creators_privileged,
    new_platform_chat_id,
    no_guests,
    space_child,
    space_parent,
    topic,
)
from lambda_plugin.roomstate import power_levels as plugin_power_levels
from lambda_plugin.spaces import chat_topic
from lambda_plugin.texts import text

# base-config.yaml's defaults, which the benchmark instance runs with
SPACE_NAME = "Lambda — {displayname}"
CHAT_NAME = "Chat {n}"
DEFAULT_AGENT = "echo"
LANGUAGE = "en"


@dataclass
class Owner:
    user: MatrixUser
    dm: str = ""
    space: str = ""
    chats: list[str] = field(default_factory=list)


@dataclass
class Topology:
    owners: list[Owner]
    chats_per_owner: int
    seconds: float = 0.0
    requests: int = 0

    @property
    def managed_rooms(self) -> int:
        return sum(1 + len(o.chats) for o in self.owners)

    @property
    def joined_rooms(self) -> int:
        return self.managed_rooms + sum(1 for o in self.owners if o.dm)


def layout(rooms: int, chats_per_owner: int = 9) -> tuple[int, int]:
    """(owners, chats per owner) for about ``rooms`` managed rooms (a Space + its chats)."""
    per = chats_per_owner + 1
    owners = max(1, round(rooms / per))
    return owners, chats_per_owner


async def power_levels(bot: MatrixUser, owner: str) -> dict:
    """The plugin's own power levels for ``owner``'s rooms, as Spaces.power_levels makes
    them (roomstate.power_levels for the homeserver's default room version, unchanged)."""
    caps = await bot.request("GET", "/_matrix/client/v3/capabilities")
    version = str(caps.get("capabilities", {}).get("m.room_versions", {}).get("default", "10"))
    return plugin_power_levels(owner, bot.user_id, creators_privileged(version))


def levels_for(template: dict, owner: str) -> dict:
    """The template from power_levels(bot, PLACEHOLDER) with the owner filled in."""
    users_map = {
        (owner if uid == PLACEHOLDER else uid): level for uid, level in template["users"].items()
    }
    return {**template, "users": users_map}


PLACEHOLDER = "@owner:placeholder"


async def create_space(bot: MatrixUser, user_id: str, levels: dict) -> str:
    """The plugin's Spaces._create_space request."""
    displayname = user_id.split(":")[0].lstrip("@")
    name = SPACE_NAME.format(displayname=displayname, user_id=user_id)
    return await bot.create_room(
        name=clean_name(name)[:255],
        preset="private_chat",
        visibility="private",
        creation_content={"type": "m.space"},
        invite=[user_id],
        initial_state=[
            Marker(kind=KIND_SPACE, owner=user_id).state_event(),
            no_guests(),
            topic(text(LANGUAGE, "space.topic")),
        ],
        power_level_content_override=levels,
    )


async def create_chat(
    bot: MatrixUser, user_id: str, space: str, number: int, levels: dict, server: str, call=None
) -> str:
    """The plugin's Spaces._create_chat requests: createRoom, then the Space's child event."""
    call = call or (lambda fn: fn())
    marker = Marker(
        kind=KIND_CHAT,
        owner=user_id,
        space_id=space,
        chat_id=f"C{number}",
        agent_id=DEFAULT_AGENT,
        platform_chat_id=new_platform_chat_id(),
    )
    room_id = await call(
        lambda: bot.create_room(
            name=CHAT_NAME.format(n=number),
            preset="private_chat",
            visibility="private",
            invite=[user_id],
            initial_state=[
                marker.state_event(),
                {"type": "m.space.parent", "state_key": space, "content": space_parent(server)},
                no_guests(),
                topic(chat_topic(LANGUAGE, DEFAULT_AGENT)),
            ],
            power_level_content_override=levels,
        )
    )
    await call(lambda: bot.send_state(space, "m.space.child", space_child(server, number), room_id))
    return room_id


async def provision(
    bot: MatrixUser,
    users: list[MatrixUser],
    chats_per_owner: int,
    server: str = "localhost",
    concurrency: int = 12,
    timeout: float = 1800,
) -> Topology:
    """Gives every user a DM with the bot, a Space and ``chats_per_owner`` chat rooms."""
    started = time.monotonic()
    owners = [Owner(u) for u in users]
    limit = asyncio.Semaphore(concurrency)
    requests = 0
    template = await power_levels(bot, PLACEHOLDER)

    async def call(coro_fn):
        nonlocal requests
        async with limit:
            requests += 1
            return await coro_fn()

    async def dm_and_space(owner: Owner) -> None:
        user_id = owner.user.user_id
        owner.dm = await call(lambda: owner.user.dm(bot.user_id))
        await call(lambda: bot.join(owner.dm))
        owner.space = await call(lambda: create_space(bot, user_id, levels_for(template, user_id)))

    async def chat(owner: Owner, number: int) -> None:
        user_id = owner.user.user_id
        room_id = await create_chat(
            bot, user_id, owner.space, number, levels_for(template, user_id), server, call
        )
        owner.chats.append(room_id)

    async def everything() -> None:
        await asyncio.gather(*(dm_and_space(o) for o in owners))
        await asyncio.gather(*(chat(o, n) for n in range(1, chats_per_owner + 1) for o in owners))

    await asyncio.wait_for(everything(), timeout)
    return Topology(owners, chats_per_owner, time.monotonic() - started, requests)
