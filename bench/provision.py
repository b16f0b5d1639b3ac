"""provision: N users invite the bot at once; the time until each holds both the Space and
the first chat room invite, and whether anyone got two of either. Next to it, the same with
the homeserver alone: a plain client on the bot's account answers each invite as fast as it
can with the plugin's own requests (join, Space, chat room, child link), the plugin stopped."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from devstack.matrix import Event, MatrixUser

from .common import CpuMeter, SyncLoop, invite_is_space, median, percentile, wait_idle
from .env import BenchStack
from .topology import PLACEHOLDER, create_chat, create_space, levels_for, power_levels

TIMEOUT = 120
SETTLE_S = 3.0  # after the last user is done: time for a duplicate to show up


async def _invite_everyone(
    stack: BenchStack, users: list[MatrixUser]
) -> tuple[list[float], int, dict[str, Any], list[tuple[MatrixUser, str]]]:
    """All users DM the bot at once; (seconds each, duplicate invites, cpu, user+room)."""
    loops = [SyncLoop(u) for u in users]
    await asyncio.gather(*(loop.start() for loop in loops))
    dms: dict[str, str] = {}
    try:
        await wait_idle(stack.pids(), timeout=30)
        meter = CpuMeter(stack.pids()).start()

        async def one(user: MatrixUser, loop: SyncLoop) -> float:
            started = time.monotonic()
            dm = dms[user.user_id] = await user.dm(stack.bot_id)

            def both() -> float | None:
                space = [t for r, (t, s) in loop.invites.items() if invite_is_space(s)]
                rooms = [
                    t for r, (t, s) in loop.invites.items() if not invite_is_space(s) and r != dm
                ]
                return max(min(space), min(rooms)) if space and rooms else None

            done = await loop.wait(both, TIMEOUT, "the Space and room invites")
            return done - started

        took = await asyncio.gather(*(one(u, lp) for u, lp in zip(users, loops, strict=True)))
        cpu = meter.stop()
        await asyncio.sleep(SETTLE_S)
        duplicates = 0
        handoff: list[tuple[MatrixUser, str]] = []
        for user, loop in zip(users, loops, strict=True):
            spaces = [r for r, (_, s) in loop.invites.items() if invite_is_space(s)]
            rooms = [
                r
                for r, (_, s) in loop.invites.items()
                if not invite_is_space(s) and r != dms[user.user_id]
            ]
            duplicates += max(0, len(spaces) - 1) + max(0, len(rooms) - 1)
            handoff.append((user, rooms[0]))
    finally:
        for loop in loops:
            await loop.stop()
    return list(took), duplicates, cpu, handoff


async def _homeserver_alone(stack: BenchStack, users_n: int) -> tuple[list[float], dict]:
    """The same, answered by a plain client on the bot's account (plugin stopped)."""
    bot = await stack.bot_device()
    template = await power_levels(bot, PLACEHOLDER)
    prefix = stack.unique("floor")
    users = await stack.users(prefix + "u", users_n)
    tasks: set[asyncio.Task] = set()

    async def answer(room_id: str, inviter: str) -> None:
        levels = levels_for(template, inviter)
        await bot.join(room_id)
        space = await create_space(bot, inviter, levels)
        await create_chat(bot, inviter, space, 1, levels, "localhost")

    def on_invite(room_id: str, state: list[Event], _arrived: float) -> None:
        inviter = next(
            (
                e.get("sender", "")
                for e in state
                if e.get("type") == "m.room.member" and e.get("state_key") == bot.user_id
            ),
            "",
        )
        if inviter.startswith(f"@{prefix}u"):
            task = asyncio.create_task(answer(room_id, inviter))
            tasks.add(task)

    bot_loop = SyncLoop(bot, on_invite=on_invite)
    await stack.set_instance_started(False)
    try:
        await bot_loop.start()
        took, _, cpu, _ = await _invite_everyone(stack, users)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        await bot_loop.stop()
        for task in tasks:
            task.cancel()
        assert stack.log is not None
        mark = stack.log.mark()
        await stack.set_instance_started(True)
        await stack.log.wait_for("Reconciled: ", mark, timeout=120)  # serving again
    return took, cpu


async def run(
    stack: BenchStack, users_n: int, log
) -> tuple[dict[str, Any], list[tuple[MatrixUser, str]]]:
    """The figures, and each user with its first chat room (for the burst)."""
    # one user alone first: the time without contention
    alone, _, _, _ = await _invite_everyone(stack, await stack.users("solo", 1))
    users = await stack.users("prov", users_n)
    took, duplicates, cpu, handoff = await _invite_everyone(stack, users)
    rows = await stack.sql(
        "SELECT user_id, COUNT(*) AS n FROM chat_room WHERE user_id LIKE '@prov%' GROUP BY user_id"
    )
    db_duplicates = sum(max(0, int(r["n"]) - 1) for r in rows)
    log(
        f"provision: p50 {median(took):.2f}s p95 {percentile(took, 95):.2f}s (alone {alone[0]:.2f}s)"
    )
    floor, floor_cpu = await _homeserver_alone(stack, users_n)
    log(f"provision, homeserver alone: p50 {median(floor):.2f}s p95 {percentile(floor, 95):.2f}s")
    return {
        "users": users_n,
        "p50_s": round(median(took), 3),
        "p95_s": round(percentile(took, 95), 3),
        "duplicates": duplicates + db_duplicates,
        "alone_s": round(alone[0], 3),
        "hs_floor_p50_s": round(median(floor), 3),
        "hs_floor_p95_s": round(percentile(floor, 95), 3),
        "overhead_p50_s": round(median(took) - median(floor), 3),
        "max_s": round(max(took), 3),
        "duplicate_invites": duplicates,
        "duplicate_db_rows": db_duplicates,
        "cpu": cpu,
        "hs_floor_cpu": floor_cpu,
    }, handoff
